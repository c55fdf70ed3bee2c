"""A generator of simple children's stories in the style of TinyStories — the project's offline corpus.

TinyStories (Eldan & Li, 2023) showed that a tiny language model learns fluent English when the
text is simple: a small vocabulary, short sentences, and stories with a clear shape. This module
writes such stories with no network and no model, so every notebook and the MoE training CLI
(`--dataset synthetic`) have real, structured text to learn from on a fresh machine.

Every story has the same three-part shape, written in three paragraphs:

    beginning   who the hero is, where they are, what they love
    problem     something goes wrong (a lost toy, a fear, rain, a friend who wants to share, ...)
    ending      how it is solved, how everyone feels, and often a small lesson

What a small model can learn from it (and what makes it non-trivial):
- agreement: a character introduced as a girl is "she"/"her" for the rest of the story, a boy
  "he"/"him"/"his"; the same name and the same object come back in later paragraphs;
- articles: "a red ball" but "an old kite";
- plot logic: a lost object is found, a broken one is fixed, a scared hero ends up proud;
- dialogue in quotes, with "said"/"asked"/"shouted".

The generator is deterministic for a seed: `generate_stories(n, seed)` always returns the same
list, and the first k stories of a longer list equal `generate_stories(k, seed)`.
It writes about 20,000 stories in a second or two.

Run `python phase3_components/src/synthetic_stories.py` to print a few stories.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from phase1_foundation.src.validation import check_int

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily",
    "Mia",
    "Sue",
    "Emma",
    "Anna",
    "Lucy",
    "Zoe",
    "Ella",
    "Rose",
    "Amy",
    "Kate",
    "Sara",
    "Molly",
    "Ruby",
    "Nora",
    "Daisy",
)
BOY_NAMES = (
    "Tom",
    "Ben",
    "Max",
    "Sam",
    "Leo",
    "Jack",
    "Tim",
    "Finn",
    "Jake",
    "Noah",
    "Bob",
    "Luke",
    "Oscar",
    "Theo",
    "Eli",
    "Ned",
)
PET_NAMES = (
    "Spot",
    "Whiskers",
    "Fluffy",
    "Pip",
    "Coco",
    "Buddy",
    "Rusty",
    "Hoppy",
    "Sunny",
    "Bubbles",
    "Patch",
    "Ziggy",
)

PEOPLE = (("girl", "she"), ("boy", "he"))
ANIMALS = ("dog", "cat", "bunny", "bird", "bear", "fox", "duck", "frog", "mouse", "puppy", "kitten", "owl")
PERSON_ADJECTIVES = ("little", "kind", "happy", "curious", "brave", "shy", "clever", "cheerful")
ANIMAL_ADJECTIVES = ("small", "fluffy", "little", "brown", "white", "playful", "tiny", "friendly")

# (preposition, place, things you find there)
PLACES = (
    ("in", "the park", ("a big tree", "the swings", "a green bench", "the slide")),
    ("in", "the forest", ("a tall tree", "a mossy log", "a little stream", "a pile of leaves")),
    ("at", "the beach", ("the warm sand", "a big rock", "the blue waves", "a sand castle")),
    ("in", "the garden", ("the red flowers", "a small pond", "the old fence", "a row of carrots")),
    ("on", "the farm", ("the red barn", "a pile of hay", "the muddy pond", "the apple tree")),
    ("by", "the river", ("a flat stone", "the tall grass", "a wooden bridge", "a little boat")),
    ("in", "the backyard", ("the sandbox", "a big bush", "the fence", "the flower bed")),
    ("at", "the playground", ("the slide", "the seesaw", "the monkey bars", "the sandbox")),
    ("on", "the hill", ("a big rock", "the soft grass", "a lonely tree", "a field of flowers")),
    ("near", "the pond", ("the lily pads", "a wooden dock", "the tall reeds", "a muddy bank")),
)

# (adjectives that fit, noun)
OBJECTS = (
    (("red", "shiny", "bouncy", "big", "old"), "ball"),
    (("colorful", "long", "yellow", "old", "new"), "kite"),
    (("blue", "fast", "little", "shiny", "old"), "toy car"),
    (("soft", "brown", "old", "fluffy", "little"), "teddy bear"),
    (("red", "big", "orange", "shiny", "round"), "balloon"),
    (("funny", "green", "warm", "big", "old"), "hat"),
    (("new", "big", "old", "colorful", "thick"), "book"),
    (("wooden", "little", "red", "old", "toy"), "boat"),
    (("pretty", "soft", "old", "little", "favorite"), "doll"),
    (("loud", "small", "red", "new", "shiny"), "drum"),
    (("shiny", "pink", "smooth", "tiny", "white"), "shell"),
    (("warm", "purple", "soft", "long", "striped"), "scarf"),
)

# (toy, what happens to it when it breaks, what fixes it)
BREAKABLE = (
    ("kite", "got a big hole in it", "a piece of tape"),
    ("toy car", "lost a wheel", "some glue"),
    ("teddy bear", "tore open at the arm", "a needle and thread"),
    ("boat", "cracked down the middle", "some glue"),
    ("doll", "lost an arm", "some glue"),
    ("drum", "got a hole in the top", "a piece of tape"),
    ("train", "lost a wheel", "a tiny screw"),
)

GOOD_FEELINGS = ("happy", "glad", "proud", "excited", "thankful")
BAD_FEELINGS = ("sad", "upset", "worried", "unhappy")

# (the scary thing to do, the same thing in -ing form)
BRAVE_ACTS = (
    ("climb the tall tree", "climbing the tall tree"),
    ("go down the big slide", "going down the big slide"),
    ("swim in the cold lake", "swimming in the cold lake"),
    ("jump over the little stream", "jumping over the little stream"),
    ("ride a bike", "riding a bike"),
    ("sing in front of the class", "singing in front of the class"),
    ("walk across the wooden bridge", "walking across the wooden bridge"),
)

# (animal in trouble, what is wrong, how the hero helps, what happens after)
ANIMALS_IN_TROUBLE = (
    ("a little bird", "had a hurt wing", "made a soft bed of leaves for it", "flew up into the sky"),
    ("a small kitten", "was stuck up in a tree", "gently lifted it down", "purred and rubbed against"),
    ("a tiny turtle", "was lying on its back", "turned it over carefully", "walked slowly back to the pond"),
    (
        "a lost puppy",
        "could not find its home",
        "read the name on its collar and took it home",
        "wagged its tail",
    ),
    ("a baby duck", "could not find its mother", "walked it back to the pond", "swam to its mother"),
)

GIFTS = (
    ("a cake", "baked", "flour went everywhere"),
    ("a card", "made", "the paint spilled on the table"),
    ("a bunch of flowers", "picked", "the flowers got squashed in the rain"),
    ("a necklace of beads", "made", "the string broke and the beads rolled away"),
    ("a picture", "drawn", "the dog walked across the paper with muddy paws"),
)

RAINY_GAMES = (
    "built a fort with pillows and blankets",
    "drew pictures of the sun",
    "played a game of hide and seek in the house",
    "made paper boats",
    "told each other funny stories",
)

LESSONS = {
    "lost": (
        "It is good to have friends who help you.",
        "Never give up when you look for something.",
        "Friends help each other.",
    ),
    "share": (
        "Sharing makes playing more fun.",
        "It is kind to share with your friends.",
        "Playing together is better than playing alone.",
    ),
    "brave": (
        "Being brave means trying even when you are scared.",
        "Good friends help you be brave.",
        "You can do hard things if you try.",
    ),
    "broken": (
        "When something breaks, you can often fix it with help.",
        "It is okay to be sad, and it is good to ask for help.",
    ),
    "rain": ("You can have fun even on a rainy day.", "After the rain, the sun always comes back."),
    "animal": ("It is good to help those who are in trouble.", "Being kind to animals is important."),
    "gift": ("A gift made with love is the best gift.", "It is the love that counts, not the mess."),
    "seed": ("Good things take time.", "If you are patient, little things can grow big."),
    "new_friend": ("A kind word can make a new friend.", "Everyone feels better with a friend."),
    "way_home": ("It is important to stay close to home.", "When you are lost, stop and think."),
}

# (plant, what grows from it)
PLANTS = (
    ("sunflower seed", "a tall yellow sunflower"),
    ("bean", "a green bean plant with long beans"),
    ("apple seed", "a little apple tree"),
    ("pumpkin seed", "a big orange pumpkin"),
    ("tomato seed", "a plant full of red tomatoes"),
)

# (something to follow, how it moves)
FOLLOWED_THINGS = (
    ("a yellow butterfly", "fluttered"),
    ("a rolling ball", "rolled"),
    ("a little rabbit", "hopped"),
    ("a red leaf in the wind", "danced"),
)


# ----------------------------------------------------------------------------------------------
# Characters and small grammar helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    """A story character: a name, what it is ("girl", "dog", ...) and its pronouns."""

    name: str
    kind: str
    he: str  # subject pronoun: "he" / "she"

    @property
    def him(self) -> str:  # object pronoun
        return "him" if self.he == "he" else "her"

    @property
    def his(self) -> str:  # possessive
        return "his" if self.he == "he" else "her"

    @property
    def He(self) -> str:  # capitalised, for the start of a sentence
        return self.he.capitalize()

    @property
    def His(self) -> str:
        return self.his.capitalize()


def with_article(phrase: str) -> str:
    """'red ball' -> 'a red ball', 'old kite' -> 'an old kite'."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def make_character(rng: random.Random, avoid_name: str = "") -> tuple[Character, str]:
    """Draw a character; return it and how the story introduces it ('a shy girl named Mia')."""
    if rng.random() < 0.65:  # people are the most common heroes
        kind, he = rng.choice(PEOPLE)
        names = GIRL_NAMES if he == "she" else BOY_NAMES
        adjective = rng.choice(PERSON_ADJECTIVES)
    else:
        kind, he = rng.choice(ANIMALS), rng.choice(("he", "she"))
        names = PET_NAMES
        adjective = rng.choice(ANIMAL_ADJECTIVES)
    name = rng.choice([n for n in names if n != avoid_name])
    return Character(name, kind, he), f"{with_article(adjective)} {kind} named {name}"


def friend_of(rng: random.Random, hero: Character) -> tuple[Character, str]:
    """A second character with a different name, introduced briefly ('a friend named Ben')."""
    friend, _ = make_character(rng, avoid_name=hero.name)
    label = rng.choice(("friend", "best friend", "neighbor", "new friend"))
    if friend.kind not in ("girl", "boy"):
        return friend, f"{hero.his} {label} {friend.name} the {friend.kind}"
    return friend, f"{hero.his} {label} {friend.name}"


def sentence(text: str) -> str:
    """Capitalise the first letter (templates may start with a pronoun)."""
    return text[0].upper() + text[1:]


def paragraph(*sentences: str) -> str:
    return " ".join(sentence(s) for s in sentences if s)


# ----------------------------------------------------------------------------------------------
# Story parts
# ----------------------------------------------------------------------------------------------


def opening(rng: random.Random, intro: str, hero: Character, prep: str, place: str) -> str:
    """The first sentence: who the hero is and (sometimes) where."""
    return rng.choice(
        (
            f"Once upon a time, there was {intro}.",
            f"Once upon a time, {prep} {place}, there lived {intro}.",
            f"There once was {intro} who lived near {place}.",
            f"One sunny morning, {intro} went to play {prep} {place}.",
            f"{sentence(intro)} loved to play {prep} {place}.",
        )
    )


def say(rng: random.Random, who: Character, words: str, question: bool = False) -> str:
    """A line of dialogue: '"Can I play?" asked Ben.' / 'Ben said, "Let's go!"'"""
    verb = "asked" if question else rng.choice(("said", "said", "shouted", "whispered"))
    if rng.random() < 0.5:
        # a quote before "said" ends with a comma instead of a full stop: "Let's go," said Ben.
        quoted = words[:-1] + "," if words.endswith(".") else words
        return f'"{quoted}" {verb} {who.name}.'
    return f'{who.name} {verb}, "{words}"'


def story_lost(rng, hero, intro, prep, place, things) -> list[str]:
    adjectives, noun = rng.choice(OBJECTS)
    obj = f"{rng.choice(adjectives)} {noun}"
    friend, friend_intro = friend_of(rng, hero)
    spots = rng.sample(things, 3)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"{hero.name} had {with_article(obj)}.",
        rng.choice(
            (
                f"{hero.He} took it everywhere {hero.he} went.",
                f"It was {hero.his} favorite toy in the whole world.",
                f"{hero.He} loved the {noun} very much.",
            )
        ),
    )
    problem = paragraph(
        f"One day, {hero.name} went to {place} with {friend_intro}.",
        f"They played all morning, but when it was time to go home, the {noun} was gone!",
        f"{hero.name} felt very {rng.choice(BAD_FEELINGS)}.",
        say(rng, hero, f"Where is my {noun}?", question=True),
    )
    end = paragraph(
        say(rng, friend, "Don't worry. I will help you look."),
        f"They looked near {spots[0]} and they looked near {spots[1]}.",
        f"At last, {friend.name} found the {noun} next to {spots[2]}.",
        f"{hero.name} hugged {friend.name} and said thank you.",
        f"{hero.He} was so {rng.choice(GOOD_FEELINGS)} to have {hero.his} {noun} back.",
        rng.choice(LESSONS["lost"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_share(rng, hero, intro, prep, place, things) -> list[str]:
    adjectives, noun = rng.choice(OBJECTS)
    obj = f"{rng.choice(adjectives)} {noun}"
    friend, friend_intro = friend_of(rng, hero)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One day, {hero.his} mom gave {hero.him} {with_article(obj)}.",
        f"{hero.name} played with the {noun} near {rng.choice(things)} all day.",
    )
    problem = paragraph(
        f"Then {friend_intro} came by.",
        say(rng, friend, f"Can I play with your {noun} too?", question=True),
        rng.choice((f"But {hero.name} did not want to share.", f"But {hero.name} held the {noun} tight.")),
        say(rng, hero, f"No, it is my {noun}!"),
        f"{friend.name} felt {rng.choice(BAD_FEELINGS)} and walked away.",
    )
    end = paragraph(
        f"Soon {hero.name} was not having fun anymore.",
        rng.choice(("Playing alone was boring.", f"{hero.He} missed {hero.his} friend.")),
        f'{hero.He} ran after {friend.name} and said, "I am sorry. Let\'s play together."',
        f"They took turns with the {noun} and laughed a lot.",
        f"{hero.name} and {friend.name} were very {rng.choice(GOOD_FEELINGS)}.",
        rng.choice(LESSONS["share"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_brave(rng, hero, intro, prep, place, things) -> list[str]:
    act, acting = rng.choice(BRAVE_ACTS)
    friend, friend_intro = friend_of(rng, hero)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"{hero.name} wanted to {act}, but {hero.he} was scared.",
        rng.choice(
            (
                f"Every day {hero.he} looked at it and shook {hero.his} head.",
                f"{hero.He} thought {hero.he} was too small.",
            )
        ),
    )
    problem = paragraph(
        f'One day, {friend_intro} saw {hero.him} and asked, "Why do you look so {rng.choice(BAD_FEELINGS)}?"',
        say(rng, hero, f"I want to {act}, but I am afraid."),
        say(rng, friend, "You can do it. I will be right here with you."),
    )
    end = paragraph(
        f"{hero.name} took a deep breath.",
        rng.choice((f"Step by step, {hero.he} began {acting}.", f"Slowly, {hero.he} started {acting}.")),
        "It was not so scary after all!",
        say(rng, hero, "I did it!"),
        f"{hero.name} felt {rng.choice(('proud', 'brave', 'happy'))}, and {friend.name} cheered.",
        rng.choice(LESSONS["brave"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_broken(rng, hero, intro, prep, place, things) -> list[str]:
    noun, damage, fix = rng.choice(BREAKABLE)
    obj = f"{rng.choice(('little', 'old', 'new', 'red', 'blue', 'favorite'))} {noun}"
    helper = rng.choice(("mom", "dad", "grandma", "grandpa"))
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"{hero.name} had {with_article(obj)} that {hero.he} loved.",
        f"Every day, {hero.he} played with it near {rng.choice(things)}.",
    )
    problem = paragraph(
        rng.choice(("One day, the", "But one day, the")) + f" {noun} fell on the floor and {damage}.",
        f"{hero.name} began to cry.",
        f"{hero.He} was very {rng.choice(BAD_FEELINGS)}.",
        f"{hero.His} {helper} heard {hero.him} and came to see what was wrong.",
    )
    end = paragraph(
        f'"Let\'s fix it together," said {hero.his} {helper}.',
        f"They used {fix}, and soon the {noun} was as good as new.",
        f"{hero.name} smiled and gave {hero.his} {helper} a big hug.",
        f"From then on, {hero.he} was careful with {hero.his} {noun}.",
        rng.choice(LESSONS["broken"]) if rng.random() < 0.5 else "",
    )
    return [begin, problem, end]


def story_rain(rng, hero, intro, prep, place, things) -> list[str]:
    friend, friend_intro = friend_of(rng, hero)
    game = rng.choice(RAINY_GAMES)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One day, {hero.name} and {friend_intro} wanted to play {prep} {place}.",
        f"They wanted to play near {rng.choice(things)}.",
    )
    problem = paragraph(
        "But then dark clouds came, and it started to rain.",
        f"{hero.name} looked out of the window and felt {rng.choice(BAD_FEELINGS)}.",
        say(rng, hero, "Now we cannot go outside."),
    )
    end = paragraph(
        say(rng, friend, "We can have fun inside!"),
        f"So they {game}.",
        "They had so much fun that they forgot about the rain.",
        rng.choice(
            (
                "When the rain stopped, they saw a big rainbow in the sky.",
                "Later, the sun came out, and they ran outside to jump in the puddles.",
            )
        ),
        rng.choice(LESSONS["rain"]) if rng.random() < 0.5 else "",
    )
    return [begin, problem, end]


def story_animal(rng, hero, intro, prep, place, things) -> list[str]:
    animal, trouble, help_, after = rng.choice(ANIMALS_IN_TROUBLE)
    animal_noun = animal.split()[-1]
    after_sentence = (
        f"The {animal_noun} {after} {hero.name}."
        if after.endswith("against")
        else f"The {animal_noun} {after}."
    )
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One day, {hero.name} was walking {prep} {place} when {hero.he} heard a small sound.",
    )
    problem = paragraph(
        f"Near {rng.choice(things)}, {hero.he} found {animal}.",
        f"The {animal_noun} {trouble}.",
        f"{hero.name} felt {rng.choice(('sorry for it', 'worried', 'sad'))}.",
        say(rng, hero, "Don't be scared. I will help you."),
    )
    end = paragraph(
        f"{hero.name} {help_}.",
        after_sentence,
        f"{hero.name} felt warm and {rng.choice(GOOD_FEELINGS)} inside.",
        rng.choice(
            (
                f"After that, the {animal_noun} and {hero.name} were friends.",
                f"Every day after that, {hero.name} came back to say hello.",
            )
        ),
        rng.choice(LESSONS["animal"]) if rng.random() < 0.5 else "",
    )
    return [begin, problem, end]


def story_gift(rng, hero, intro, prep, place, things) -> list[str]:
    gift, verb, mishap = rng.choice(GIFTS)
    who = rng.choice(("mom", "dad", "grandma", "grandpa"))
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"It was {hero.his} {who}'s birthday, and {hero.name} wanted to give {hero.his} {who} a surprise.",
        f"{hero.He} decided to make {gift}.",
    )
    problem = paragraph(
        f"{hero.name} worked very hard, but {mishap}.",
        f"{hero.He} felt {rng.choice(BAD_FEELINGS)}.",
        say(rng, hero, "Now my surprise is ruined."),
    )
    end = paragraph(
        f"When {hero.his} {who} came home, {hero.name} showed {hero.his} {who} what {hero.he} had {verb}.",
        f'{hero.His} {who} smiled and said, "It is the best gift I ever got, because you made it for me."',
        f"{hero.name} felt {rng.choice(GOOD_FEELINGS)}, and they both laughed.",
        rng.choice(LESSONS["gift"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_seed(rng, hero, intro, prep, place, things) -> list[str]:
    plant, grown = rng.choice(PLANTS)
    friend, friend_intro = friend_of(rng, hero)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One spring day, {hero.name} planted {with_article(plant)} near {rng.choice(things)}.",
        f"Every morning, {hero.he} gave it some water and waited.",
    )
    problem = paragraph(
        rng.choice(("But many days went by, and nothing grew.", "But the ground stayed brown and empty.")),
        f"{hero.name} felt {rng.choice(BAD_FEELINGS)}.",
        say(rng, hero, "Maybe my seed will never grow.", question=False),
        f"Then {friend_intro} came to look.",
        say(rng, friend, "Plants need time. Let's keep giving it water."),
    )
    end = paragraph(
        f"So {hero.name} waited, and {hero.he} kept giving it water every day.",
        f"One morning, {hero.he} saw a tiny green sprout!",
        f"By the end of the summer, it had grown into {grown}.",
        f"{hero.name} shared it with {friend.name}, and they were both very {rng.choice(GOOD_FEELINGS)}.",
        rng.choice(LESSONS["seed"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_new_friend(rng, hero, intro, prep, place, things) -> list[str]:
    friend, _ = make_character(rng, avoid_name=hero.name)
    adjectives, noun = rng.choice(OBJECTS)
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One day, {hero.name} saw a new {friend.kind} sitting alone near {rng.choice(things)}.",
        f"The {friend.kind} looked {rng.choice(('sad', 'lonely', 'shy'))}.",
    )
    problem = paragraph(
        f"{hero.name} wanted to say hello, but {hero.he} felt shy too.",
        rng.choice((f"{hero.He} did not know what to say.", f"{hero.His} cheeks turned red.")),
        f"Then {hero.he} remembered {hero.his} {rng.choice(adjectives)} {noun}.",
    )
    end = paragraph(
        f'{hero.name} walked over and said, "Hi, I am {hero.name}. Do you want to play with my {noun}?"',
        f'The {friend.kind} smiled and said, "Yes! My name is {friend.name}."',
        f"They played with the {noun} until the sun went down.",
        f"From that day on, {hero.name} and {friend.name} were best friends.",
        rng.choice(LESSONS["new_friend"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


def story_way_home(rng, hero, intro, prep, place, things) -> list[str]:
    followed, moved = rng.choice(FOLLOWED_THINGS)
    followed_noun = followed.split(" in ")[0].split()[-1]
    landmark, other = rng.sample(things, 2)
    helper = rng.choice(("a wise old owl", "a friendly dog", "a kind farmer", "a big brown bear"))
    begin = paragraph(
        opening(rng, intro, hero, prep, place),
        f"One afternoon, {hero.name} saw {followed}.",
        f"It {moved} away, and {hero.name} followed it, farther and farther.",
    )
    problem = paragraph(
        f"Soon the {followed_noun} was gone, and {hero.name} looked around.",
        f"Nothing looked the same. {hero.He} could not find the way home.",
        f"{hero.name} felt {rng.choice(('scared', 'worried', 'very small'))} and began to cry.",
    )
    end = paragraph(
        f'Then {helper} came by and asked, "Why are you crying?"',
        say(rng, hero, "I am lost. I live near " + landmark + "."),
        f"The {helper.split()[-1]} knew the way. They walked past {other}, and there was {landmark}!",
        f"{hero.name} ran home, and {hero.his} mom gave {hero.him} a big hug.",
        rng.choice(LESSONS["way_home"]) if rng.random() < 0.6 else "",
    )
    return [begin, problem, end]


PLOTS = (
    story_lost,
    story_share,
    story_brave,
    story_broken,
    story_rain,
    story_animal,
    story_gift,
    story_seed,
    story_new_friend,
    story_way_home,
)


@dataclass(frozen=True)
class LabelledStory:
    """A story with what the generator knows about it: free labels for classification and evaluation.

    plot: which template wrote it ("lost", "share", "brave", ... : `PLOT_NAMES`);
    hero_name / hero_kind ("girl", "boy" or an animal) / hero_pronoun ("he" or "she"); place ("the park").
    """

    text: str
    plot: str
    hero_name: str
    hero_kind: str
    hero_pronoun: str
    place: str

    @property
    def paragraphs(self) -> list[str]:
        """[beginning, problem, ending]"""
        return self.text.split("\n\n")


PLOT_NAMES = tuple(plot.__name__.removeprefix("story_") for plot in PLOTS)


def generate_labelled_story(rng: random.Random) -> LabelledStory:
    """One story and its labels (the random draws are those of `generate_story`, in the same order)."""
    hero, intro = make_character(rng)
    prep, place, things = rng.choice(PLACES)
    plot = rng.choice(PLOTS)
    text = "\n\n".join(plot(rng, hero, intro, prep, place, things))
    return LabelledStory(text, plot.__name__.removeprefix("story_"), hero.name, hero.kind, hero.he, place)


def generate_story(rng: random.Random) -> str:
    """One story: three paragraphs (beginning, problem, ending) separated by a blank line."""
    return generate_labelled_story(rng).text


def generate_labelled_stories(n_stories: int, seed: int = 0) -> list[LabelledStory]:
    """`generate_stories(n_stories, seed)` with each story's labels: the same texts, in the same order."""
    check_int("n_stories", n_stories, minimum=0)
    rng = random.Random(seed)
    return [generate_labelled_story(rng) for _ in range(n_stories)]


def generate_stories(n_stories: int, seed: int = 0) -> list[str]:
    """Return `n_stories` children's stories, the same list for the same seed.

    Each story is three paragraphs separated by a blank line ("\\n\\n"). Use different seeds
    for the training and validation splits (the MoE pipeline uses `seed` and `seed + 1`).
    """
    check_int("n_stories", n_stories, minimum=0)
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n_stories)]


if __name__ == "__main__":
    for story in generate_stories(3, seed=0):
        print(story, end="\n\n" + "-" * 80 + "\n\n")
