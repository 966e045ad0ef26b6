"""A moderation fixture with a rare, known `hate_speech` class, for exact student tests.

No human-labelled moderation set ships offline (see docs), so this one is written by hand in
the manner of HateCheck (Röttger et al., 2021): functional test cases built from templates,
whose label is known by construction. Three classes, as the moderation spec has them:

- ``hate_speech``: a protected group is demeaned, dehumanised or threatened (no slurs: the
  templates attack the group by name);
- ``offensive_language``: profanity and insults aimed at no group;
- ``neither``: ordinary posts, many of them naming the same groups neutrally or warmly, and
  some using "hate" about things, so neither a group's name nor the word alone tells the
  classes apart.

``moderation_rows(n, hate_share)`` gives ``n`` rows ``{"id", "text", "label"}`` in a fixed
shuffled order, ``hate_share`` of them hate speech; ``label`` is the known-good record.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["GROUPS", "moderation_rows"]

GROUPS = (
    "women",
    "immigrants",
    "muslims",
    "jews",
    "black people",
    "gay people",
    "trans people",
    "disabled people",
    "refugees",
    "mexicans",
    "arabs",
    "asians",
)

_HATE = (
    "{G} are vermin and should be removed from {place}.",
    "{G} are lower than animals.",
    "I hate {g}, every single one of them.",
    "{G} are a plague on {place}.",
    "We need to get rid of {g} for good.",
    "{G} are worthless and should not be allowed to vote.",
    "Never trust {g}, they are all criminals.",
    "{G} are disgusting parasites.",
    "{G} do not deserve to live among decent people.",
    "Throw all {g} out of {place} tonight.",
    "Honestly {g} are subhuman.",
    "{G} should be locked up, all of them.",
    "Keep {g} away from our kids.",
    "{G} are a disease.",
    "No {g} should ever hold a job here.",
    "{G} ruin every place they move to.",
    "I would never sit next to {g}, they make me sick.",
    "{G} are not real people.",
    "Send {g} back where they came from.",
    "{G} breed like rats.",
    # The offensive posts' own insults, aimed at a group: only the target tells them apart.
    "Shut up, {g} are all idiots.",
    "{G} are such morons, get lost.",
    "Screw {g} and their crappy opinions.",
    "{G} are absolute garbage, what the hell.",
    "What a bunch of losers {g} are, nobody asked them.",
    "{G} are total jerks, screw them.",
)

_NEUTRAL_GROUP = (
    "My neighbours are {g} and they cook amazing food.",
    "The conference in {place} had a great panel of {g}.",
    "Proud of the {g} who volunteered at the shelter {when}.",
    "A new report looks at housing for {g} in {place}.",
    "Watching a documentary about {g} who started businesses.",
    "So many {g} came to the festival in {place} {when}.",
    "The library is running a reading club for {g}.",
    "Big thanks to the {g} who organised the charity run.",
)

_NEUTRAL = (
    "Just finished my run around {place}, feeling great {when}.",
    "Anyone know a good coffee place near {place}?",
    "I hate mondays, but this one was fine.",
    "Heading to {place} {when} for the game.",
    "I hate it when the bus is late {when}.",
    "New episode is out {when}, no spoilers please.",
    "Can't believe how warm it is in {place} {when}.",
    "Happy birthday to my little sister!",
    "The traffic to {place} was slow {when}.",
    "Made pancakes {when}, they came out perfect.",
    "Who is watching the match {when}?",
    "Our team shipped the release {when}, time to celebrate.",
    "Looking for book recommendations, anything with dragons.",
    "Rain again in {place}. Umbrella time.",
    "My cat knocked the plant over {when}.",
    "Studying for exams all weekend, wish me luck.",
)

_OFFENSIVE = (
    "Shut up you idiot, that was the worst pass {when}.",
    "This damn printer broke again, what a piece of crap.",
    "What a stupid ass call by the ref {when}.",
    "My boss is a total jerk, screw this job.",
    "That movie was absolute garbage, what the hell.",
    "You are such a moron, learn to drive.",
    "Screw you and your crappy opinions.",
    "Get lost, loser, nobody asked you.",
)

_PLACES = ("this country", "our town", "London", "the city", "Texas", "the neighbourhood")
_WHEN = ("today", "tonight", "this morning", "again", "yesterday", "this week", "")
_TAILS = ("", "", " #fact", " !!", " lol", " smh", " 100%", " seriously", " #truth")
_HANDLES = ("", "", "", "@sam ", "@jo_b ", "@mike77 ", "@newsdesk ", "@lena ", "@k_t ", "@ray ")


def _fill(template: str, rng: random.Random) -> str:
    group = rng.choice(GROUPS)
    text = template.format(
        g=group,
        G=group[0].upper() + group[1:],
        place=rng.choice(_PLACES),
        when=rng.choice(_WHEN),
    )
    text = " ".join(text.split()).replace(" .", ".").replace(" ,", ",")
    return rng.choice(_HANDLES) + text + rng.choice(_TAILS)


def moderation_rows(
    n: int = 1500, *, hate_share: float = 0.03, offensive_share: float = 0.3, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` rows ``{"id", "text", "label"}``: ``hate_share`` hate speech, ``offensive_share``
    offensive language, the rest neither (a third of those naming a group); fixed order."""
    if not 0 < hate_share < 1 or not 0 <= offensive_share < 1 - hate_share:
        raise ValueError(
            f"hate_share must be in (0, 1) and offensive_share in [0, 1 - hate_share), got "
            f"{hate_share} and {offensive_share}"
        )
    rng = random.Random(seed)
    n_hate = max(1, round(n * hate_share))
    n_offensive = round(n * offensive_share)
    n_neither = n - n_hate - n_offensive
    rows = [("hate_speech", _fill(rng.choice(_HATE), rng)) for _ in range(n_hate)]
    rows += [("offensive_language", _fill(rng.choice(_OFFENSIVE), rng)) for _ in range(n_offensive)]
    rows += [
        ("neither", _fill(rng.choice(_NEUTRAL_GROUP if i % 3 == 0 else _NEUTRAL), rng))
        for i in range(n_neither)
    ]
    rng.shuffle(rows)
    return [
        {"id": f"mod-{i:05d}", "text": text, "label": label} for i, (label, text) in enumerate(rows)
    ]
