"""A tiny embedded corpus for the Phase 2 notebooks: traditional English nursery rhymes.

About 4 KB of public-domain text (18th–19th century rhymes), small enough that a GPT with a
hundred thousand parameters learns its spelling, line breaks and refrains in a minute on a CPU,
and repetitive enough that you can *see* it learning (samples go from noise to rhyme-like lines).

Tokenization is character-level with Phase 3's `CharTokenizer` (the vocabulary is the sorted set
of characters in the text); batching uses Phase 3's `train_val_split` and `get_random_batch`.

    tokenizer, get_batch = make_char_batches(block_size=64, batch_size=16)
    x, y = get_batch("train")            # LongTensors [B, T]; y is x shifted left by one token

Run `python phase2_architecture/src/toy_corpus.py` to print the corpus statistics and a batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.text_data import get_random_batch, train_val_split

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


def make_char_batches(
    block_size: int,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    text: str = NURSERY_RHYMES,
) -> tuple[CharTokenizer, GetBatch]:
    """Character-level tokenizer for `text` and a `get_batch(split)` sampling random windows.

    The last `val_fraction` of the text is held out as the validation split. Batches are
    reproducible: the same seed gives the same sequence of batches.
    """
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)  # [N]
    splits = dict(zip(("train", "val"), train_val_split(ids, val_fraction)))
    generator = torch.Generator().manual_seed(seed)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'.")
        return get_random_batch(splits[split], batch_size, block_size, generator=generator)

    return tokenizer, get_batch


if __name__ == "__main__":
    tok, get_batch = make_char_batches(block_size=32, batch_size=2)
    print(f"{len(NURSERY_RHYMES):,} characters, vocabulary of {tok.vocab_size}: {''.join(tok.itos)!r}")
    x, y = get_batch("train")
    print("x[0]:", repr(tok.decode(x[0].tolist())))
    print("y[0]:", repr(tok.decode(y[0].tolist())))
