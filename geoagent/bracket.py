"""A knockout for ``--explain``: a tournament's matches as a bracket (its rounds, who met whom, who went on, ties
and byes), and a set-wise knockout's sets round by round.

The trace records each match with its round (``Match.round``). Who went on after a tie (the evidence decides)
and who had a bye (an odd number left: the best by evidence waits) are read off the next round's players.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from geoagent.types import Match, SetMatch
from geoagent.words import count


def has_rounds(matches: Sequence[Match]) -> bool:
    """True when every match knows its round (a tournament traced by this version)."""
    return bool(matches) and all(m.round is not None for m in matches)


def tournament_bracket(matches: Sequence[Match], label: Mapping[str, str], pool: Sequence[str] = ()) -> Group:
    """One table per round, in bracket order (the better seed's match first), then the champion.

    ``label``: how each candidate id is shown; ``pool``: candidate ids in seed order, for the ordering.
    """
    seed = {cid: i for i, cid in enumerate(pool)}
    rounds: dict[int, list[Match]] = {}
    for m in matches:
        rounds.setdefault(m.round or 0, []).append(m)
    numbers = sorted(rounds)
    players = {r: {cid for m in rounds[r] for cid in (m.a, m.b)} for r in numbers}
    ties = sum(m.winner is None and not m.failed for m in matches)
    failed = sum(m.failed for m in matches)
    parts: list[Table | Text] = [
        Text(f"tournament: {count(len(matches), 'match', 'matches')} in {count(len(numbers), 'round')}, {count(ties, 'tie')}"
             + (f", {failed} with no answer" if failed else ""), style="bold")
    ]
    for index, r in enumerate(numbers):
        following = players[numbers[index + 1]] if index + 1 < len(numbers) else set()
        title = "final" if r == numbers[-1] else f"round {r} of {numbers[-1]}"
        table = Table("", "", "", "went on", "asks (shown first → chosen)", box=None, pad_edge=False, title=title, title_justify="left", show_header=index == 0)
        for m in sorted(rounds[r], key=lambda m: min(seed.get(m.a, len(seed)), seed.get(m.b, len(seed)))):
            table.add_row(Text(label.get(m.a, m.a)), Text("vs", style="dim"), Text(label.get(m.b, m.b)), _outcome(m, following, label), _asks(m, label))
        for bye in sorted(following - players[r], key=lambda cid: seed.get(cid, len(seed))):
            table.add_row(Text(label.get(bye, bye)), Text("bye", style="dim"), Text(""), Text(label.get(bye, bye)), Text("(an odd number left: the best by evidence waits)", style="dim"))
        parts.append(table)
    final = rounds[numbers[-1]]
    champion = final[0].winner if len(final) == 1 else None
    parts.append(Text(f"champion: {label.get(champion, champion)}" if champion else "champion: a tie in the final, settled by the evidence"))
    return Group(*parts)


def _outcome(m: Match, following: set[str], label: Mapping[str, str]) -> Text:
    if m.winner is not None:
        return Text(label.get(m.winner, m.winner))
    went_on = next((cid for cid in (m.a, m.b) if cid in following), None)
    text = Text("no answer", style="red") if m.failed else Text("tie", style="yellow")
    if went_on is not None:
        text.append(f" → {label.get(went_on, went_on)} (evidence)", style="default")
    return text


def _asks(m: Match, label: Mapping[str, str]) -> Text:
    asks = []
    for i, vote in enumerate(m.votes):
        shown = m.shown_first[i] if i < len(m.shown_first) else None
        chosen = label.get(vote, vote) if vote is not None else "failed"
        asks.append(f"{label.get(shown, shown)} → {chosen}" if shown is not None else chosen)
    return Text("; ".join(asks))


def setwise_knockout(sets: Sequence[SetMatch], label: Mapping[str, str], pool: Sequence[str] = ()) -> Group:
    """Each set on one line, round by round: its candidates (best by evidence first), who went on, and each ask
    (the candidate shown in slot A → the one chosen); then byes and the champion. ``pool``: candidate ids in
    seed order, for the order of the byes."""
    seed = {cid: i for i, cid in enumerate(pool)}
    rounds: dict[int, list[SetMatch]] = {}
    for s in sets:
        rounds.setdefault(s.round, []).append(s)
    numbers = sorted(rounds)
    unanswered = sum(s.winner is None for s in sets)
    parts: list[Text] = [Text(f"set-wise knockout: {count(len(sets), 'set')} in {count(len(numbers), 'round')}"
                              + (f", {unanswered} settled by the evidence" if unanswered else ""), style="bold")]
    for index, r in enumerate(numbers):
        title = "final" if r == numbers[-1] else f"round {r} of {numbers[-1]}"
        parts.append(Text(title, style="italic"))
        for s in rounds[r]:
            line = Text("  " + ", ".join(label.get(m, m) for m in s.members) + "  →  went on: ")
            line.append(label.get(s.went_on, s.went_on), style="bold")
            if s.winner is None:
                line.append(" (no answer)" if s.failed else " (answers disagreed)", style="red" if s.failed else "yellow")
                line.append(" by evidence")
            asks = [f"{label.get(order[0], order[0])} → {label.get(v, v) if v is not None else 'failed'}" for order, v in zip(s.shown, s.votes)]
            line.append(f"  asks (shown first → chosen): {'; '.join(asks)}", style="dim")
            parts.append(line)
        if index + 1 < len(numbers):
            playing = {m for s in rounds[r] for m in s.members}
            byes = sorted((m for s in rounds[numbers[index + 1]] for m in s.members if m not in playing), key=lambda m: seed.get(m, len(seed)))
            if byes:
                parts.append(Text("  byes (the best by evidence wait): " + ", ".join(label.get(m, m) for m in byes), style="dim"))
    champion = rounds[numbers[-1]][0].went_on if numbers else None
    if champion is not None:
        parts.append(Text(f"champion: {label.get(champion, champion)}"))
    return Group(*parts)
