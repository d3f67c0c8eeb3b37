"""Gated promotion (the promote command's work): `python -m src.promote [--force] [--rollback]`.

The alias `champion` moves to the `challenger` version only if the challenger beats the
champion on register.gate: its gate metric improves by more than nothing and at least
`min_gain`, and its sensitivity falls by no more than `max_sensitivity_drop` (a screening
aid that misses more disease is not better, whatever its AUC).  The numbers are read from
the versions' own `metric.<name>` tags, written by register, so old runs' files are not needed.
Before any gate the challenger's tags must belong to it: the CV run its metrics were computed
from (`metrics_cv_parent_run_id`) must be the CV run it was registered from (`cv_parent_run_id`),
likewise the checkpoints' hash; a mismatch is refused outright, a version registered before
these tags existed only with --force.

Every move is recorded twice: a `champion_history` tag on the registered model (the ordered
log that --rollback replays as a stack), and on each version the periods it held the alias
(`champion_periods`) with who moved it and how.  Registry stages are deprecated; only
aliases are used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from src.core.config import GateParams, Params
from src.core.errors import BoneHealthError
from src.core.text_table import text_table
from src.core.tracking import configure
from src.serving.registry import (
    CHECKPOINTS_TAG,
    METRIC_TAG_PREFIX,
    METRICS_CHECKPOINTS_TAG,
    METRICS_CV_TAG,
    current_user,
    utc_now,
)

HISTORY_TAG = "champion_history"
PERIODS_TAG = "champion_periods"
SHOWN_METRICS = ["oof_roc_auc", "oof_sensitivity", "oof_specificity", "oof_brier", "oof_ece"]


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    moved: bool
    action: str  # first | gate | force | rollback | refused | unchanged
    champion: str | None  # the champion version after the command
    previous: str | None  # the champion version before it
    reasons: list[str] = field(default_factory=list)
    table: str = ""


# ------------------------------------------------------------------ metrics provenance
def check_metrics_provenance(name: str, mv, *, force: bool) -> list[str]:
    """Refuse a version whose metric tags were computed for another CV than the one it was
    registered from (the gate would judge another model's numbers); --force cannot override
    that.  A version registered before the provenance tags existed is refused unless --force;
    the returned reasons say that it was forced."""
    tags, where = mv.tags, f"{name} version {mv.version}"
    metrics_run, registered_run = tags.get(METRICS_CV_TAG), tags.get("cv_parent_run_id")
    if not metrics_run:
        if force:
            return [f"--force: {where} has no {METRICS_CV_TAG!r} tag; its metrics were not checked against its CV"]
        raise BoneHealthError(f"{where}: no {METRICS_CV_TAG!r} tag (registered before metrics provenance was recorded), "
                              "so its metrics may be another CV's; re-register it with `python -m src.register` "
                              "after `python -m src.evaluate`, or promote it anyway with --force")
    if metrics_run != registered_run:
        raise BoneHealthError(f"{where}: tag {METRICS_CV_TAG}={metrics_run} but it was registered from CV run "
                              f"{registered_run} (tag cv_parent_run_id); its metric tags are another CV's, re-register it")
    if tags.get(METRICS_CHECKPOINTS_TAG) != tags.get(CHECKPOINTS_TAG):
        raise BoneHealthError(f"{where}: tag {METRICS_CHECKPOINTS_TAG} differs from {CHECKPOINTS_TAG} (both of CV run "
                              f"{registered_run}): its metrics are of other checkpoints, re-register it")
    return []


# ------------------------------------------------------------------------ the gate
def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def floor_decision(challenger: dict[str, float], gate: GateParams) -> Decision:
    """An absolute bar, first champion included: the gate metric's confidence interval must lie
    on the good side of `gate.floor` (chance for AUC), so a model whose CI reaches chance is never
    promoted on its point estimate alone."""
    if gate.floor is None:
        return Decision(True)
    side, bound = ("ci_low", "above") if gate.direction == "maximize" else ("ci_high", "below")
    key = f"{gate.metric}_{side}"
    value = challenger.get(key)
    if not _usable(value):
        return Decision(False, [f"challenger has no usable {key!r} (tag {METRIC_TAG_PREFIX}{key}): cannot check "
                                f"register.gate.floor {gate.floor:g}; use --force"])
    ok = value > gate.floor if gate.direction == "maximize" else value < gate.floor
    if ok:
        return Decision(True, [f"{key} {value:.4f} clears the floor {gate.floor:g}"])
    return Decision(False, [f"{key} {value:.4f} is not {bound} register.gate.floor {gate.floor:g}: the CI of "
                            f"{gate.metric} reaches chance; the challenger is not promoted (override: --force)"])


def gate_decision(challenger: dict[str, float], champion: dict[str, float], gate: GateParams) -> Decision:
    """Challenger beats champion: metric gain > 0 and >= min_gain, sensitivity drop <= tolerance."""
    reasons: list[str] = []
    ok = True
    key = gate.metric
    new, old = challenger.get(key), champion.get(key)
    if not _usable(new) or not _usable(old):
        who = "challenger" if not _usable(new) else "champion"
        return Decision(False, [f"{who} has no usable {key!r} (tag {METRIC_TAG_PREFIX}{key}); cannot compare, use --force"])
    gain = (new - old) if gate.direction == "maximize" else (old - new)
    better = "higher" if gate.direction == "maximize" else "lower"
    if gain <= 0 or gain < gate.min_gain:
        ok = False
        need = f"a gain of at least {gate.min_gain:g}" if gate.min_gain > 0 else f"a {better} value"
        reasons.append(f"{key} {new:.4f} vs champion {old:.4f}: gain {gain:+.4f}, the gate needs {need}")
    else:
        reasons.append(f"{key} {new:.4f} vs champion {old:.4f}: gain {gain:+.4f} passes (min_gain {gate.min_gain:g})")
    skey = gate.sensitivity_metric
    s_new, s_old = challenger.get(skey), champion.get(skey)
    if not _usable(s_new) or not _usable(s_old):
        ok = False
        reasons.append(f"{skey} missing on the {'challenger' if not _usable(s_new) else 'champion'}; cannot check the sensitivity drop")
    else:
        drop = s_old - s_new
        if drop > gate.max_sensitivity_drop + 1e-12:
            ok = False
            reasons.append(f"{skey} drops {drop:.4f} ({s_old:.4f} -> {s_new:.4f}) > allowed {gate.max_sensitivity_drop:g}")
        else:
            reasons.append(f"{skey} {s_old:.4f} -> {s_new:.4f} within the allowed drop {gate.max_sensitivity_drop:g}")
    return Decision(ok, reasons)


def comparison_table(challenger, champion, gate: GateParams, labels: tuple[str, str] = ("challenger", "champion")) -> str:
    """Both versions side by side: the gate's numbers first, then the usual screening metrics."""
    keys = [gate.metric, f"{gate.metric}_ci_low", f"{gate.metric}_ci_high", gate.sensitivity_metric]
    keys += [k for k in SHOWN_METRICS if k not in keys]
    cols = list(zip(labels, (challenger, champion)))
    header = ["", *[f"{name} v{mv.version}" if mv is not None else f"{name} (none)" for name, mv in cols]]
    rows = []
    metrics = [version_metrics(mv.tags) if mv is not None else {} for _, mv in cols]
    for key in keys:
        if all(key not in m for m in metrics):
            continue
        rows.append([key, *[f"{m[key]:.4f}" if key in m else "-" for m in metrics]])
    for tag in ("registered_at", "git_commit", "strategy"):
        rows.append([tag, *[str(mv.tags.get(tag, "-")) if mv is not None else "-" for _, mv in cols]])
    return text_table(header, rows)


# --------------------------------------------------------------------- registry I/O
def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # A missing alias is INVALID_PARAMETER_VALUE "... alias X not found" on SQLite stores.
        if "not found" in str(exc).lower():
            return None
        raise


def history(client, name: str) -> list[dict[str, Any]]:
    model = client.get_registered_model(name)
    raw = model.tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def champion_stack(events: list[dict[str, Any]], current: str | None) -> list[str]:
    """Replay the moves: a promotion pushes its version, a rollback pops one; a champion set by
    hand outside this command (UI, API) is treated as pushed on top."""
    stack: list[str] = []
    for event in events:
        if event["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != event["to"]:
                stack.append(event["to"])
        else:
            stack.append(event["to"])
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def _record_move(client, name: str, *, action: str, old: str | None, new: str, reasons: list[str]) -> None:
    when, who = utc_now(), current_user()
    events = history(client, name)
    events.append({"at": when, "by": who, "action": action, "from": old, "to": new, "reasons": reasons})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(events))
    if old is not None:
        _close_period(client, name, old, when, new)
    periods = _periods(client, name, new)
    periods.append({"from": when, "until": None, "action": action, "by": who, "previous": old})
    client.set_model_version_tag(name, new, PERIODS_TAG, json.dumps(periods))
    client.set_model_version_tag(name, new, "champion_since", when)
    client.set_model_version_tag(name, new, "champion_action", action)
    client.set_model_version_tag(name, new, "champion_by", who)


def _periods(client, name: str, version: str) -> list[dict[str, Any]]:
    raw = client.get_model_version(name, version).tags.get(PERIODS_TAG)
    return json.loads(raw) if raw else []


def _close_period(client, name: str, version: str, when: str, successor: str) -> None:
    periods = _periods(client, name, version)
    if periods and periods[-1].get("until") is None:
        periods[-1]["until"] = when
        periods[-1]["replaced_by"] = successor
    client.set_model_version_tag(name, version, PERIODS_TAG, json.dumps(periods))
    client.set_model_version_tag(name, version, "champion_until", when)
    client.set_model_version_tag(name, version, "champion_replaced_by", successor)


def _client(params: Params):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(params.mlflow)
    client = MlflowClient()
    try:
        client.get_registered_model(params.register.name)
    except MlflowException:
        raise BoneHealthError(
            f"register.name: no registered model {params.register.name!r} in the tracking store; "
            "run `python -m src.register` first"
        ) from None
    return client


# --------------------------------------------------------------------------- commands
def promote(params: Params, *, force: bool = False) -> Outcome:
    cfg = params.register
    client = _client(params)
    challenger = _alias_version(client, cfg.name, cfg.challenger_alias)
    if challenger is None:
        raise BoneHealthError(
            f"register.challenger_alias: no version of {cfg.name!r} has alias {cfg.challenger_alias!r}; "
            "run `python -m src.register` first"
        )
    champion = _alias_version(client, cfg.name, cfg.champion_alias)
    table = comparison_table(challenger, champion, cfg.gate)
    if champion is not None and champion.version == challenger.version:
        return Outcome(False, "unchanged", str(champion.version), str(champion.version),
                       [f"version {challenger.version} already holds {cfg.champion_alias!r}"], table)
    checked = check_metrics_provenance(cfg.name, challenger, force=force)
    floor = floor_decision(version_metrics(challenger.tags), cfg.gate)
    if not floor.promote and not force:
        held = None if champion is None else str(champion.version)
        return Outcome(False, "refused", held, held, floor.reasons, table)
    if not floor.promote:
        checked = checked + floor.reasons + ["--force: promoted although the floor refused"]
    if champion is None:
        action, reasons = "first", [f"no version holds {cfg.champion_alias!r} yet: the challenger takes it, "
                                    "having cleared the floor"]
    else:
        decision = gate_decision(version_metrics(challenger.tags), version_metrics(champion.tags), cfg.gate)
        reasons = decision.reasons
        if decision.promote:
            action = "gate"
        elif force:
            action = "force"
            reasons = reasons + ["--force: promoted although the gate refused"]
        else:
            return Outcome(False, "refused", str(champion.version), str(champion.version), reasons, table)
    if checked:  # the move needed --force whatever the gate said: record it as forced
        action, reasons = "force", reasons + checked
    old = None if champion is None else str(champion.version)
    client.set_registered_model_alias(cfg.name, cfg.champion_alias, challenger.version)
    _record_move(client, cfg.name, action=action, old=old, new=str(challenger.version), reasons=reasons)
    return Outcome(True, action, str(challenger.version), old, reasons, table)


def rollback(params: Params) -> Outcome:
    """Give the champion alias back to the version that held it before the current one."""
    cfg = params.register
    client = _client(params)
    champion = _alias_version(client, cfg.name, cfg.champion_alias)
    if champion is None:
        raise BoneHealthError(f"--rollback: no version of {cfg.name!r} holds {cfg.champion_alias!r}; nothing to roll back")
    stack = champion_stack(history(client, cfg.name), str(champion.version))
    if len(stack) < 2:
        raise BoneHealthError(
            f"--rollback: version {champion.version} is the first {cfg.champion_alias!r} of {cfg.name!r}; no previous holder"
        )
    target = stack[-2]
    previous = client.get_model_version(cfg.name, target)
    table = comparison_table(previous, champion, cfg.gate, labels=("restored", "champion"))
    reasons = [f"--rollback: {cfg.champion_alias!r} returns from version {champion.version} to version {target}"]
    client.set_registered_model_alias(cfg.name, cfg.champion_alias, target)
    _record_move(client, cfg.name, action="rollback", old=str(champion.version), new=target, reasons=reasons)
    return Outcome(True, "rollback", target, str(champion.version), reasons, table)
