"""A synthetic visual question-answering task whose answers depend on small image regions.

Scenes hold one to four coloured shapes (28 to 40 px across: a few 14-pixel patches) on a
noisy canvas of one of several anyres aspect ratios. Four question types, one-word answers:

- attribute: "what color is the circle ?"            -> red / green / blue / yellow
- position:  "is the red square on the left or right ?" -> left / right
- count:     "how many blue objects are there ?"      -> zero / one / two / three
- presence:  "is there a green triangle ?"            -> yes / no

Dropping the few tokens that cover the asked-about object changes the answer, so the task
tells good token selection from bad. `make_example` draws the held-out split (one question a
scene); `make_dialogue` draws training scenes that are asked every kind of question in turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ["square", "circle", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
NUMBERS = ["zero", "one", "two", "three", "four"]
# (width, height) of the canvases: the aspect ratios of the model's anyres grid.
SIZES = [(224, 224), (224, 112), (112, 224), (336, 112), (112, 336), (200, 150), (150, 200)]
KINDS = ["attribute", "position", "count", "presence"]
ANSWERS = list(COLORS) + ["left", "right"] + NUMBERS + ["yes", "no"]
VOCABULARY = sorted(set(
    " ".join(["what color is the", "is the", "on the left or right", "how many objects are there",
              "is there a", "?", *SHAPES, *COLORS, *NUMBERS, "yes no left right"]).split()))


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: int
    y: int
    r: int


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Example:
    """One scene, one question: what the held-out split and the evaluation use."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    objects: tuple[Obj, ...] = ()

    @property
    def turns(self) -> tuple[Turn, ...]:
        return (Turn(self.question, self.answer, self.kind),)


@dataclass(frozen=True)
class Dialogue:
    """One scene, one question of every kind it allows, asked in turn: a training example
    that supervises several answers for one pass over the image."""

    image: Image.Image
    turns: tuple[Turn, ...]
    objects: tuple[Obj, ...] = ()


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill: tuple[int, int, int]) -> None:
    if o.shape == "square":
        draw.rectangle([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
    elif o.shape == "circle":
        draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
    else:
        draw.polygon([(o.x, o.y - o.r), (o.x - o.r, o.y + o.r), (o.x + o.r, o.y + o.r)], fill=fill)


def scene(rng: random.Random, width: int, height: int, count: int) -> list[Obj]:
    objs: list[Obj] = []
    for _ in range(200):
        if len(objs) == count:
            break
        r = rng.randint(14, 20)
        x, y = rng.randint(r + 2, width - r - 3), rng.randint(r + 2, height - r - 3)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 6) ** 2 for o in objs):
            objs.append(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, r))
    return objs


def render(rng: random.Random, width: int, height: int, objs: list[Obj]) -> Image.Image:
    base = tuple(rng.randint(90, 150) for _ in range(3))
    img = Image.new("RGB", (width, height), base)
    noise = Image.effect_noise((width, height), 18).convert("RGB")
    img = Image.blend(img, noise, 0.25)
    draw = ImageDraw.Draw(img)
    for o in objs:
        _draw(draw, o, COLORS[o.color])
    return img


def label_image(width: int, height: int, objs: tuple[Obj, ...]) -> Image.Image:
    """The scene's objects as class indices: red = colour + 1, green = shape + 1, 0 = background."""
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in objs:
        _draw(draw, o, (list(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1, 0))
    return img


def ask(rng: random.Random, kind: str, objs: list[Obj], width: int) -> Turn | None:
    """A question of `kind` about the scene, or None when the scene has nothing to ask it of."""
    if kind == "attribute":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return Turn(f"what color is the {o.shape} ?", o.color, kind)
    if kind == "position":
        unique = [o for o in objs if sum((p.shape, p.color) == (o.shape, o.color) for p in objs) == 1
                  and abs(o.x - width / 2) > 16]
        if not unique:
            return None
        o = rng.choice(unique)
        return Turn(f"is the {o.color} {o.shape} on the left or right ?", "left" if o.x < width / 2 else "right",
                    kind)
    if kind == "count":
        color = rng.choice(list(COLORS))
        return Turn(f"how many {color} objects are there ?", NUMBERS[sum(o.color == color for o in objs)], kind)
    if rng.random() < 0.5:
        o = rng.choice(objs)
        shape, color = o.shape, o.color
    else:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    present = any((o.shape, o.color) == (shape, color) for o in objs)
    return Turn(f"is there a {color} {shape} ?", "yes" if present else "no", kind)


def make_example(seed: int) -> Example:
    rng = random.Random(seed)
    width, height = rng.choice(SIZES)
    kind = KINDS[seed % len(KINDS)]
    objs = scene(rng, width, height, rng.randint(1, 4))
    turn = ask(rng, kind, objs, width)
    if turn is None:
        return make_example(seed + 7919 * len(KINDS))
    return Example(render(rng, width, height, objs), turn.question, turn.answer, kind, tuple(objs))


def make_dialogue(seed: int) -> Dialogue:
    rng = random.Random(seed)
    width, height = rng.choice(SIZES)
    objs = scene(rng, width, height, rng.randint(1, 4))
    turns = [ask(rng, kind, objs, width) for kind in rng.sample(KINDS, len(KINDS))]
    return Dialogue(render(rng, width, height, objs), tuple(t for t in turns if t is not None), tuple(objs))


TEST_SEEDS = range(10**8, 10**8 + 400)  # held out: never drawn by training
