"""bench/programs.py's rows for the search programs: Tree of Thoughts, Skeleton-of-Thought
and self-consistency, each beside the same job done by prompt serving.

The LIP forms prefill their shared prompt once and fork it; the prompt forms send every
request with its whole prompt (bench/prompt_serving.py), the independent ones at once,
and build exactly the token sequences the forks hold, so that where both forms are
greedy (Skeleton-of-Thought) or sample with the same seeds (self-consistency) they must
make the same text.
"""

from __future__ import annotations

import functools
from typing import Any

import prompt_serving
import trio
from program_rows import Row, example

from symphony.lipctl.aio import AsyncLip

tree_of_thought = example("tree_of_thought")
skeleton_of_thought = example("skeleton_of_thought")
self_consistency = example("self_consistency")

# the puzzle of examples/tree_of_thought.py: reach 35 from 3 4 5
TOT: dict[str, Any] = dict(numbers=(3, 4, 5), target=35, branches=4, keep=2, max_tokens=20)
# the word problem of examples/self_consistency.py, whose answer is 15
SC: dict[str, Any] = {"chains": 12, "max_tokens": 48}
SOT_QUESTION = "What are the main steps for a beginner beekeeper?"
SOT_CONTEXT = """\
Keeping honeybees starts long before the first hive arrives. A beginner should spend a \
season learning from a local beekeeping club, where experienced keepers open hives in \
front of newcomers and explain what they see: the queen, the brood, the stores of honey \
and pollen, and the signs of disease. Most clubs lend protective clothing and let new \
members handle frames under supervision, which is the fastest way to lose the fear of \
stings and to learn the calm, slow movements that keep a colony gentle.

The site matters as much as the bees. A hive needs morning sun, shelter from strong \
wind, a flat and dry base, and a water source within a short flight, such as a pond or \
a shallow dish with stones. Neighbours should be considered: a tall hedge or fence in \
front of the entrance makes the bees fly up and over people instead of through a \
garden. Many towns have rules about how many hives may stand on a plot and how far they \
must be from a path, so it is worth checking with the council first.

Equipment is simpler than it looks. A beginner needs a hive with a floor, brood box, \
queen excluder, supers for honey, a crown board and a roof, plus a veil or suit, gloves, \
a smoker and a hive tool. Buying everything new from one supplier keeps the parts \
compatible; second-hand boxes can carry disease and should be scorched before use. Bees \
can be bought as a nucleus colony, a small working colony with a laying queen on five \
frames, which is easier to start with than a package of loose bees or a caught swarm.

The first year is about keeping the colony healthy rather than taking honey. The hive \
should be inspected every seven to ten days from spring to late summer, looking for \
eggs, which show that the queen is laying, for queen cells, which warn that the colony \
may swarm, and for the varroa mite, the most serious pest of honeybees. Varroa numbers \
can be counted on a sticky board under the mesh floor, and treatments are applied after \
the honey is off, in late summer and again in winter. A colony that goes into autumn \
with too little food should be fed with thick sugar syrup.

Swarming is the natural way colonies reproduce, and it catches many beginners by \
surprise. When a colony runs out of space, it raises new queens and half of the bees \
leave with the old one. Adding supers in time, giving the queen room to lay, and making \
an artificial swarm when queen cells appear all reduce the loss. Keeping notes of every \
inspection, with the date, the weather, the temper of the bees and what was done, turns \
each visit into a lesson and makes the next year easier.

Honey is taken only when the frames in the supers are at least three quarters capped \
with wax, which shows that the bees have dried the nectar enough for it to keep. The \
supers are cleared of bees with a board that lets them out but not back in, carried \
indoors, uncapped with a warm knife and spun in an extractor. The honey is strained \
through a fine mesh and left to settle for a few days before it is jarred. A strong \
colony in a good year may give twenty or thirty pounds, but a first-year colony often \
needs all of its stores, and a careful beginner leaves it that food.

Winter is the quiet test of the whole year. The bees cluster around the queen and live \
on the honey and syrup stored in autumn, so the hive should be heavy when lifted at the \
back in October. The entrance is narrowed with a guard to keep out mice, the roof is \
weighted against storms, and the hive is left closed except for a quick check of its \
weight on a mild day. A colony that comes through to spring with a laying queen and \
enough bees to cover several frames is the best sign that its keeper has learned well.
"""
SOT: dict[str, Any] = {"question": SOT_QUESTION, "context": SOT_CONTEXT, "point_tokens": 32}


async def tree_of_thought_prompts(
    lip: AsyncLip,
    numbers: tuple[int, ...],
    target: int,
    branches: int,
    keep: int,
    max_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    """The same breadth-first search: every thought is a request with the whole path's
    text, and every value one (the logprobs of " yes" and of " no" as the next token; two,
    by echo + logprobs, where either is several tokens); nothing is pruned mid-thought."""
    tot = tree_of_thought
    prompt = await lip.tokenize(tot.puzzle_prompt(numbers, target))
    question = await lip.tokenize(tot.VALUE_QUESTION)
    yes, no = await lip.tokenize(" yes"), await lip.tokenize(" no")
    State = tuple[list[int], list[str], float]  # path ids after the prompt, lines, value

    async def grow(level: int, rank: int, parent: State, children: list[State]) -> None:
        parent_rank, number = divmod(rank, branches)
        sampler = {
            "temperature": temperature,
            "seed": tot.branch_seed(seed, level, parent_rank, number),
        }
        result = await prompt_serving.generate(
            lip, prompt + parent[0], max_tokens=max_tokens, stop=["\n"], **sampler
        )
        path, line, means = parent[0] + result.token_ids, result.text.strip(), [0.0, 0.0]

        async def mean(i: int, choice: list[int]) -> None:
            asked = prompt + path + question
            means[i] = await prompt_serving.logprob(lip, asked, choice) / len(choice)

        if line and len(yes) == len(no) == 1:  # both in one request, of the next token
            means = await prompt_serving.next_logprobs(lip, prompt + path + question, yes + no)
        elif line:  # an empty line is no step: value 0, as in the LIP
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mean, 0, yes)
                nursery.start_soon(mean, 1, no)
        children[rank] = (path, [*parent[1], line], tot.yes_share(*means) if line else 0.0)

    states: list[State] = [([], [], 0.0)]
    for level in range(len(numbers) - 1):
        children: list[State] = [([], [], 0.0)] * (len(states) * branches)
        async with trio.open_nursery() as nursery:
            for rank in range(len(children)):
                nursery.start_soon(grow, level, rank, states[rank // branches], children)
        states = sorted(children, key=lambda child: -child[2])[:keep]  # stable, as the LIP's
    _, lines, value = states[0]
    return {
        "output": "\n".join(lines),
        "quality": value,
        "solved": tot.solved(lines, numbers, target),
    }


async def skeleton_of_thought_prompts(
    lip: AsyncLip, question: str, context: str, point_tokens: int, skeleton_tokens: int = 100
) -> dict[str, Any]:
    """The skeleton request, then one request per point, at once, each with the whole
    question + skeleton + point prompt: the very tokens of the LIP's forks."""
    sot = skeleton_of_thought
    prompt = await sot.skeleton_prompt(lip, question, context)
    skeleton = await prompt_serving.generate(
        lip, prompt, max_tokens=skeleton_tokens, temperature=0.0, grammar={"regex": sot.SKELETON}
    )
    points = sot.points_of(skeleton.text)
    expansions = [""] * len(points)

    async def expand(i: int) -> None:
        asked = prompt + skeleton.token_ids + await sot.point_turn(lip, points[i])
        result = await prompt_serving.generate(
            lip, asked, max_tokens=point_tokens, stop=["\n"], temperature=0.0
        )
        expansions[i] = result.text

    async with trio.open_nursery() as nursery:
        for i in range(len(points)):
            nursery.start_soon(expand, i)
    return {"output": sot.join(points, expansions), "skeleton": skeleton.text, "points": points}


async def self_consistency_prompts(
    lip: AsyncLip,
    question: str = self_consistency.QUESTION,
    answer: str | None = self_consistency.ANSWER,
    chains: int = 8,
    max_tokens: int = 64,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """`chains` requests at once, each with the whole few-shot prompt and seed i."""
    sc = self_consistency
    prompt = await lip.tokenize(sc.few_shot_prompt(question))
    texts = [""] * chains

    async def sample(i: int) -> None:
        result = await prompt_serving.generate(
            lip, prompt, max_tokens=max_tokens, stop=sc.STOP, temperature=temperature, seed=i
        )
        texts[i] = result.text

    async with trio.open_nursery() as nursery:
        for i in range(chains):
            nursery.start_soon(sample, i)
    return {**sc.vote(texts, answer), "chains": texts}


ROWS: list[Row] = [
    Row(
        program="tree_of_thought",
        uses="fork, generate_stream + cancel (pruning), score",
        lip=functools.partial(tree_of_thought.run, **TOT),
        prompts=functools.partial(tree_of_thought_prompts, **TOT),
        quality='value of the best path found: P(" yes") vs " no" after its last step',
    ),
    Row(
        program="skeleton_of_thought",
        uses="generate (regex grammar), fork, generate",
        lip=functools.partial(skeleton_of_thought.run, **SOT),
        prompts=functools.partial(skeleton_of_thought_prompts, **SOT),
        same_output=True,
    ),
    Row(
        program="self_consistency",
        uses="fork, generate (seeded)",
        lip=functools.partial(self_consistency.run, **SC),
        prompts=functools.partial(self_consistency_prompts, **SC),
        quality="1.0 if the majority vote is the known answer (15), else 0.0",
        same_output=True,
        same_keys=("output", "chains"),
    ),
]
