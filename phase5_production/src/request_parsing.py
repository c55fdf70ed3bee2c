"""Request parsing: a request body (bytes) -> validated generation arguments, or a RequestError.

    parse_generate_request(raw, served, limits)     POST /generate (this course's fields)
    parse_completion_request(raw, served, limits)   POST /v1/completions (OpenAI's fields)

Every refusal is a RequestError: an HTTP status and a message that names the problem and the fix
(not JSON, too deep or too large a number, unknown fields, out-of-range parameters: 400; a model not
served here: 404). OpenAI fields this server does not implement are accepted at their neutral value
only. Prompts longer than the model's context are refused, not cut.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus

from phase5_production.src.expert_routing import check_return_routing
from phase5_production.src.served_models import ServedModel

DEFAULT_LIMITS = {"max_prompt_chars": 2000, "max_new_tokens": 500}
# logits / T must stay finite in float32: below this (but above 0 = greedy) the softmax overflows.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 1e-6  # a smaller top_p keeps only the argmax, and below ~1e-38 it underflows to 0 in float32
GENERATE_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream")
COMPLETION_FIELDS += ("return_routing",)  # our extension (expert_routing.py), not OpenAI's
MAX_STOP_SEQUENCES = 4  # as OpenAI
# The text that could still begin a stop string is held back from the stream, so a stop string's length
# is the longest delay a streamed piece can suffer; OpenAI's clients send short ones ("\n", "###").
MAX_STOP_CHARS = 256
# OpenAI fields this server does not implement, with the value that means "off". Clients send these by
# default, so the neutral value is accepted (and ignored); any other value is a 400, never ignored.
NEUTRAL_FIELDS = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": 1,
    "logit_bias": {},
    "echo": False,
    "suffix": "",
    "logprobs": None,  # null: no log-probabilities (nulls are dropped first, so any value is refused)
}


class RequestError(Exception):
    """A client error: HTTP status + a message that names the problem and the fix."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message, param)


def _json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f"the body is not valid UTF-8 JSON ({err}); send a JSON object.") from None
    except RecursionError:
        raise _bad("the body's JSON is nested too deeply; send a flat JSON object.") from None
    except ValueError as err:  # e.g. an integer literal of more than 4300 digits
        raise _bad(
            f"the body's JSON holds a value Python refuses to parse ({err}); send smaller numbers."
        ) from None
    if not isinstance(body, dict):
        raise _bad('the body must be a JSON object such as {"prompt": "Once"}.')
    _check_unicode(body)
    return body


def _check_unicode(body: dict) -> None:
    """JSON may escape a lone UTF-16 surrogate (\\ud800), which is no character: refuse it by field."""
    for name, value in body.items():
        for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise _bad(
                    f"'{name}' holds invalid Unicode: a lone surrogate at character {err.start}; send text "
                    "whose \\ud800-\\udfff escapes come in high-low pairs.",
                    name,
                ) from None


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; this endpoint accepts: {list(allowed)}.", unknown[0])


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    kind = "an integer" if integer else "a number"
    wrong_type = not isinstance(value, int if integer else (int, float)) or isinstance(value, bool)
    if wrong_type:
        raise _bad(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}.", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise _bad(f"'{name}' must be in [{low}, {high}], got {value!r}.", name)
    return value


def _temperature(body: dict, high: float) -> float:
    value = _number(body, "temperature", 1.0, 0.0, high)
    if 0 < value < MIN_TEMPERATURE:
        raise _bad(
            f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE}, {high}], got {value!r}: smaller "
            "values overflow the softmax; use 0 for greedy decoding.",
            "temperature",
        )
    return value


def _top_p(body: dict) -> float | None:
    value = _number(body, "top_p", None, 0.0, 1.0)
    if value is not None and value < MIN_TOP_P:
        raise _bad(
            f"'top_p' must be in [{MIN_TOP_P}, 1], got {value!r}: a smaller nucleus is just the most likely "
            "token (and underflows float32); use temperature 0 for greedy.",
            "top_p",
        )
    return None if value == 1 else value


def _prompt_ids(body: dict, served: ServedModel, limits: dict) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' is required and must be a non-empty string.", "prompt")
    if len(prompt) > limits["max_prompt_chars"]:
        raise _bad(
            f"'prompt' has {len(prompt)} characters; the limit is {limits['max_prompt_chars']}. Shorten it.",
            "prompt",
        )
    try:
        ids = served.encode(prompt)
    except ValueError as err:
        raise _bad(f"'prompt': {err}", "prompt") from None
    if not ids:
        raise _bad("'prompt' encodes to no tokens; send some text.", "prompt")
    if len(ids) > served.context_length:  # refused, not cut: the model would never see its start
        raise _bad(
            f"'prompt' is {len(ids)} tokens; this model has a context of {served.context_length} tokens. "
            "Shorten the prompt.",
            "prompt",
        )
    return ids


def parse_generate_request(raw: bytes, served: ServedModel, limits: dict) -> dict:
    """Validate a /generate body; return the generation arguments or raise RequestError (400)."""
    body = _json_object(raw)
    _check_fields(body, GENERATE_FIELDS)
    limit = limits["max_new_tokens"]  # the default never exceeds the server's limit
    return {
        "prompt_ids": _prompt_ids(body, served, limits),
        "max_new_tokens": _number(body, "max_new_tokens", min(100, limit), 1, limit, integer=True),
        "temperature": _temperature(body, 5.0),
        "top_k": _number(body, "top_k", None, 1, served.vocab_size, integer=True),
        "top_p": _top_p(body),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 1.0, 5.0),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
    }


def _stop_sequences(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad(
            f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_SEQUENCES} non-empty strings, "
            f"got {stop!r}.",
            "stop",
        )
    longest = max(len(s) for s in stops)
    if longest > MAX_STOP_CHARS:
        raise _bad(
            f"a 'stop' string has {longest} characters; the limit is {MAX_STOP_CHARS} characters. "
            "Use shorter stop strings.",
            "stop",
        )
    return tuple(stops)


def _accept_neutral_fields(body: dict) -> dict:
    """The body without the unsupported OpenAI fields set to their neutral value; 400 for any other."""
    body = dict(body)
    for name, neutral in NEUTRAL_FIELDS.items():
        if name not in body:
            continue
        value = body.pop(name)
        if value != neutral or isinstance(value, bool) != isinstance(neutral, bool):  # False == 0
            raise _bad(
                f"'{name}' is not supported by this server; only its neutral value {json.dumps(neutral)} "
                f"is accepted, got {json.dumps(value)}. Remove it or send {json.dumps(neutral)}.",
                name,
            )
    user = body.pop("user", "")  # an end-user id for abuse tracking: accepted, not used
    if not isinstance(user, str):
        raise _bad(f"'user' must be a string, got {user!r}.", "user")
    return body


def parse_completion_request(raw: bytes, served: ServedModel, limits: dict) -> dict:
    """Validate a /v1/completions body (OpenAI's fields); raise RequestError (400 / 404)."""
    body = _json_object(raw)
    body = {key: value for key, value in body.items() if value is not None}  # null = the default
    body = _accept_neutral_fields(body)
    _check_fields(body, COMPLETION_FIELDS)
    limit = limits["max_new_tokens"]  # the default never exceeds the server's limit
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad(f"'model' is required: pass model={served.name!r} (see GET /v1/models).", "model")
    if model != served.name:
        raise RequestError(
            HTTPStatus.NOT_FOUND,
            f"model {model!r} is not served here; this server serves {served.name!r}.",
            "model",
            "model_not_found",
        )
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise _bad(f"'n' must be 1 (one completion per request), got {body['n']!r}.", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}.", "stream")
    try:
        return_routing = check_return_routing(body.get("return_routing", False), served)
    except ValueError as err:
        raise _bad(str(err), "return_routing") from None
    return {
        "prompt_ids": _prompt_ids(body, served, limits),
        "max_new_tokens": _number(body, "max_tokens", min(16, limit), 1, limit, integer=True),  # OpenAI: 16
        "temperature": _temperature(body, 2.0),
        "top_p": _top_p(body),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
        "stop": _stop_sequences(body),
        "stream": stream,
        "return_routing": return_routing,
    }
