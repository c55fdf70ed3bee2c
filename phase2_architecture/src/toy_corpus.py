"""A tiny embedded corpus for the Phase 2 notebooks: traditional English nursery rhymes.

About 4 KB of public-domain text (18th–19th century rhymes), small enough that a GPT with a
hundred thousand parameters learns its spelling, line breaks and refrains in a minute on a CPU,
and repetitive enough that you can *see* it learning (samples go from noise to rhyme-like lines).

Tokenization is character-level: the vocabulary is the sorted set of characters in the text, and
a token id is a character's position in it (`CharVocabulary`, a dozen lines). Batches are random
windows of the id stream, the last 10% held out for validation. Phase 3 teaches tokenizers and data
pipelines in full; its `CharTokenizer`, `train_val_split` and `get_random_batch` are tested to give
exactly these ids and batches, so nothing here is a black box borrowed from a later phase.

    tokenizer, get_batch = make_char_batches(block_size=64, batch_size=16)
    x, y = get_batch("train")            # LongTensors [B, T]; y is x shifted left by one token

Run `python phase2_architecture/src/toy_corpus.py` to print the corpus statistics and a batch.
"""

from __future__ import annotations

from typing import Callable

import torch

NURSERY_RHYMES = """\
Twinkle, twinkle, little star,
How I wonder what you are!
Up above the world so high,
Like a diamond in the sky.
Twinkle, twinkle, little star,
How I wonder what you are!

Humpty Dumpty sat on a wall,
Humpty Dumpty had a great fall.
All the king's horses and all the king's men
Couldn't put Humpty together again.

Jack and Jill went up the hill
To fetch a pail of water.
Jack fell down and broke his crown,
And Jill came tumbling after.

Mary had a little lamb,
Its fleece was white as snow;
And everywhere that Mary went,
The lamb was sure to go.

Hey diddle diddle,
The cat and the fiddle,
The cow jumped over the moon;
The little dog laughed
To see such sport,
And the dish ran away with the spoon.

Baa, baa, black sheep,
Have you any wool?
Yes sir, yes sir,
Three bags full;
One for the master,
And one for the dame,
And one for the little boy
Who lives down the lane.

Little Miss Muffet
Sat on a tuffet,
Eating her curds and whey;
Along came a spider,
Who sat down beside her
And frightened Miss Muffet away.

Hickory, dickory, dock,
The mouse ran up the clock.
The clock struck one,
The mouse ran down,
Hickory, dickory, dock.

Little Bo Peep has lost her sheep,
And doesn't know where to find them;
Leave them alone, and they'll come home,
Wagging their tails behind them.

Old Mother Hubbard
Went to the cupboard,
To give the poor dog a bone;
When she came there,
The cupboard was bare,
And so the poor dog had none.

Sing a song of sixpence,
A pocket full of rye;
Four and twenty blackbirds,
Baked in a pie.
When the pie was opened,
The birds began to sing;
Wasn't that a dainty dish,
To set before the king?

Three blind mice, three blind mice,
See how they run, see how they run!
They all ran after the farmer's wife,
Who cut off their tails with a carving knife.
Did you ever see such a thing in your life,
As three blind mice?

Little Jack Horner
Sat in the corner,
Eating a Christmas pie;
He put in his thumb,
And pulled out a plum,
And said, "What a good boy am I!"

Pat-a-cake, pat-a-cake, baker's man,
Bake me a cake as fast as you can;
Pat it and prick it, and mark it with B,
And put it in the oven for baby and me.

Georgie Porgie, pudding and pie,
Kissed the girls and made them cry;
When the boys came out to play,
Georgie Porgie ran away.

Little Boy Blue,
Come blow your horn,
The sheep's in the meadow,
The cow's in the corn.

Old King Cole was a merry old soul,
And a merry old soul was he;
He called for his pipe, and he called for his bowl,
And he called for his fiddlers three.

London Bridge is falling down,
Falling down, falling down,
London Bridge is falling down,
My fair lady.

Polly put the kettle on,
Polly put the kettle on,
Polly put the kettle on,
We'll all have tea.

One, two, buckle my shoe;
Three, four, knock at the door;
Five, six, pick up sticks;
Seven, eight, lay them straight;
Nine, ten, a big fat hen.

Jack Sprat could eat no fat,
His wife could eat no lean;
And so between them both, you see,
They licked the platter clean.

Doctor Foster went to Gloucester
In a shower of rain;
He stepped in a puddle,
Right up to his middle,
And never went there again.

Rain, rain, go away,
Come again another day;
Little Johnny wants to play.

Hot cross buns! Hot cross buns!
One a penny, two a penny,
Hot cross buns!

Ladybird, ladybird, fly away home,
Your house is on fire and your children are gone.

There was an old woman who lived in a shoe,
She had so many children she didn't know what to do;
She gave them some broth without any bread,
And kissed them all soundly and put them to bed.

Simple Simon met a pieman,
Going to the fair;
Says Simple Simon to the pieman,
"Let me taste your ware."

Peter Piper picked a peck of pickled peppers;
A peck of pickled peppers Peter Piper picked.
If Peter Piper picked a peck of pickled peppers,
Where's the peck of pickled peppers Peter Piper picked?
"""

GetBatch = Callable[[str], "tuple[torch.Tensor, torch.Tensor]"]


class CharVocabulary:
    """One token per character: `itos` is the sorted list of characters, an id is a position in it."""

    def __init__(self, text: str):
        self.itos: list[str] = sorted(set(text))  # id -> character
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.itos)}  # character -> id

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the vocabulary; build it from this text.")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)


def random_windows(
    ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens (x) and the same windows shifted by one (y).

    start_b ~ Uniform{0, ..., N - T - 1};  x[b] = ids[start_b : start_b + T],  y[b] = ids[start_b + 1 : ...]
    """
    starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=generator)  # [B]
    offsets = torch.arange(block_size)  # [T]
    x = ids[starts[:, None] + offsets]  # [B, T]
    y = ids[starts[:, None] + offsets + 1]  # [B, T]: the next token at every position
    return x, y


def make_char_batches(
    block_size: int,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    text: str = NURSERY_RHYMES,
) -> tuple[CharVocabulary, GetBatch]:
    """Character vocabulary of `text` and a `get_batch(split)` sampling random windows.

    The last `val_fraction` of the text is held out as the validation split (a contiguous tail, so
    no window is in both). Batches are reproducible: the same seed gives the same sequence of batches.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    vocab = CharVocabulary(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)  # [N]
    cut = len(ids) - int(round(len(ids) * val_fraction))
    splits = {"train": ids[:cut], "val": ids[cut:]}
    for split, part in splits.items():
        if len(part) <= block_size:
            raise ValueError(
                f"the {split} split has {len(part)} tokens, not more than block_size={block_size}: "
                "use a shorter block_size, a longer text or another val_fraction."
            )
    generator = torch.Generator().manual_seed(seed)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'.")
        return random_windows(splits[split], batch_size, block_size, generator)

    return vocab, get_batch


if __name__ == "__main__":
    tok, get_batch = make_char_batches(block_size=32, batch_size=2)
    print(f"{len(NURSERY_RHYMES):,} characters, vocabulary of {tok.vocab_size}: {''.join(tok.itos)!r}")
    x, y = get_batch("train")
    print("x[0]:", repr(tok.decode(x[0].tolist())))
    print("y[0]:", repr(tok.decode(y[0].tolist())))
