"""A model card: what a partner needs to check which model answers and whether it suits them.

Built from the run's own records (model file, FHE artifacts, report), so it states nothing the run
did not measure. `card.json` for machines, `card.md` for people. Its pin, MODEL:SPEC (the model's
sha256, then its circuit's client-spec sha256), is what `predict --expect-model` takes: a server
serving another model or another circuit is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedfhe import decision, quality, table
from fedfhe.artifacts import bit_pair, n_bits_label, read_artifacts
from fedfhe.errors import FedfheError
from fedfhe.rundir import RunDir, md_cell


def build(run: RunDir) -> dict[str, Any]:
    """The card's facts: model and hash, inputs in order, classes, training and privacy, evaluation, circuit."""
    model = run.load_model()
    meta, low_high, observed = model.metadata, zip(*model.input_range), model.observed_range
    seen = [(None, None)] * model.n_features if observed is None else [(float(a), float(b)) for a, b in zip(*observed)]
    training = dict(meta.get("training", {}))
    privacy = meta.get("metrics", {}).get("privacy")
    compiled = None
    try:
        artifacts = read_artifacts(run, model)
        compiled = {
            "n_bits": artifacts.n_bits,
            "outputs": artifacts.outputs,
            "max_bit_width": artifacts.max_bit_width,
            "calibration": artifacts.calibration,
            "client_spec_sha256": hashlib.sha256(artifacts.client_spec).hexdigest(),
        }
    except FedfheError:  # not compiled yet (or compiled for another model): the card says so
        pass
    report = _report(run, model.sha256, compiled)
    return {
        "pin": model.sha256 if compiled is None else f"{model.sha256}:{compiled['client_spec_sha256']}",
        "model": {
            "sha256": model.sha256,
            "kind": model.kind.name,
            "task": "regression" if model.is_regression else "classification",
            "dataset": meta.get("dataset"),
            "training_rows": meta.get("n_train"),
            "positive_class": meta.get("positive_class"),
            "operating_point": meta.get("operating_point"),
            "decision": None if model.is_regression else decision.describe(model),
        },
        "features": [  # declared (the circuit's, refused outside) and observed (the owners' rows, or None)
            {
                "position": i,
                "name": name,
                "low": float(low),
                "high": float(high),
                "observed_low": o_low,
                "observed_high": o_high,
            }
            for i, (name, (low, high), (o_low, o_high)) in enumerate(zip(model.feature_names, low_high, seen))
        ],
        "classes": [{"class": int(c), "name": name} for c, name in zip(model.classes, model.class_names)],
        "training": {
            **{key: training.get(key) for key in ("clients", "rounds", "local_iters", "strategy", "partitioning")},
            **{key: training.get(key) for key in ("params", "input_ranges", "secagg", "dp", "seed")},
            "privacy": privacy,
        },
        "missing_values": None
        if "schema" not in meta
        else {
            "tokens": list(table.Schema.from_dict(meta["schema"]).dialect.missing),
            "rules": table.missing_rules(meta["schema"]),
            "filled_in_training": meta.get("filled"),
        },
        "evaluation": report,
        "fhe": compiled,
        "limits": _limits(model.is_regression, compiled, report, privacy, observed is not None),
    }


def _report(run: RunDir, sha256: str, compiled: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's evaluation, if it is of this very model and circuit (compile and tune replace the circuit)."""
    try:
        report = json.loads(run.report_json.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("model_sha256") != sha256:
        return None
    if compiled is None or (report.get("n_bits"), report.get("calibration"), report.get("outputs", "scores")) != (
        compiled["n_bits"],
        compiled["calibration"],
        compiled["outputs"],
    ):
        return None
    scores = {name: report[name] for name in ("accuracy", "r2", "mse") if name in report}
    return {
        "evaluated_on": report.get("evaluated_on", "test split"),
        "rows": report.get("n_test"),
        "rows_in_real_fhe": report.get("fhe_samples"),
        **scores,
        "figures": report.get("metrics"),  # with 95% intervals and row counts
        "agreement": report.get("agreement"),
    }


def _limits(
    regression: bool,
    compiled: dict[str, Any] | None,
    report: dict[str, Any] | None,
    privacy: dict[str, Any] | None,
    observed: bool,
) -> list[str]:
    """What the card's reader must not assume, from what this run did and did not measure."""
    limits = [
        "A linear model: each score is a weighted sum of the inputs; interactions it was not given are invisible.",
        "Inputs outside the declared ranges are refused, not clipped: the circuit is compiled for these ranges.",
    ]
    if observed:
        limits.append(
            "A prediction for an input outside its observed range (the owners' training rows, each owner's min and "
            "max rounded outward to two significant digits) is extrapolation, and is flagged: no training row was there."
        )
    if compiled is None:
        limits.append("Not compiled: no FHE circuit has been measured for this model.")
    else:
        inputs, weights = bit_pair(compiled["n_bits"])
        quantized = (
            f"Inputs and weights are quantized to {inputs} bits"
            if inputs == weights
            else f"Inputs are quantized to {inputs} bits and weights to {weights}"
        )
        limits.append(f"{quantized} inside the encrypted circuit.")
    if report is None:
        limits.append("Not evaluated: no score of this model and circuit is on record (run `fedfhe evaluate`).")
    else:
        limits.append(
            f"Scored on {report['rows']} rows ({report['evaluated_on']}), {report['rows_in_real_fhe']} of them in "
            "real FHE: validate on your own population before relying on it."
        )
    if privacy:
        limits.append(
            f"Client-level differential privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g}."
        )
    else:
        limits.append("No differential privacy: the weights may reveal facts about the owners' training rows.")
    if not regression and (compiled is None or compiled["outputs"] == "scores"):
        limits.append("Clients decrypt the scores, not only the class: many queries can reveal the weights.")
    elif not regression:
        limits.append(
            "Label outputs: clients learn only the class, which slows copying the model but does not stop it: "
            "enough labelled queries train a close copy (rate-limit tokens)."
        )
    return limits


def markdown(card: dict[str, Any]) -> str:
    """The card for people: headline, inputs, classes, training, evaluation, circuit, limits."""
    model, training = card["model"], card["training"]
    lines = [
        f"# Model card: {model['kind']} on {model['dataset']}",
        "",
        f"sha256 `{model['sha256']}`",
        "",
        f"Pin the model and its circuit: `fedfhe predict --expect-model {card['pin']} ...`"
        + (" (the model's sha256, then its client spec's)." if card["fhe"] else " (not compiled yet: the model only)."),
        "",
        (
            f"A {model['task']} model trained on {model['training_rows']} rows by {training['clients']} data owner(s), "
            f"{training['rounds']} round(s), strategy {training['strategy']}, secure aggregation "
            f"{'on' if training['secagg'] else 'off'}, differential privacy {'on' if training['dp'] else 'off'}."
        ),
        "",
        *_inputs(card["features"]),
        "",
    ]
    if card["classes"]:
        lines += [
            "| class | name |",
            "|---|---|",
            *(f"| {c['class']} | {md_cell(c['name'])} |" for c in card["classes"]),
            "",
        ]
    if (missing := card.get("missing_values")) is not None:
        tokens = ", ".join(repr(t) for t in missing["tokens"])
        filled = missing["filled_in_training"]
        lines += [
            f"Missing values: cells reading {tokens} are missing; "
            + ("; ".join(missing["rules"]) or "a missing cell is refused, in training and in prediction")
            + (f". Cells filled in training: {table.filled_line(filled)}." if filled is not None else "."),
            "",
        ]
    if model.get("positive_class") is not None:
        lines += [f"Positive class: {model['positive_class']} (sensitivity, PPV and AUC are about it).", ""]
    if model.get("decision") is not None:
        lines += [f"Decision: {model['decision']}.", ""]
    evaluation = card["evaluation"]
    if evaluation is not None:
        figures = evaluation.get("figures") or {}
        lines += [
            f"Evaluation on {evaluation['rows']} rows ({evaluation['evaluated_on']}), value [95% interval] counts:"
        ]
        lines += ["", *([f"**Warning:** {figures['warning']}.", ""] if "warning" in figures else [])]
        lines += [f"- {name}: {quality.shown(figure)}" for name, figure in quality.entries(figures)]
        lines.append("")
    if card["fhe"] is not None:
        fhe = card["fhe"]
        lines += [
            (
                f"FHE circuit: {fhe['outputs']} outputs, n_bits {n_bits_label(fhe['n_bits'])}, largest integer "
                f"{fhe['max_bit_width']} bits, compiled on "
                f"{fhe['calibration']}; client spec sha256 `{fhe['client_spec_sha256']}`."
            ),
            "",
        ]
    lines += ["## Limits", "", *(f"- {limit}" for limit in card["limits"]), ""]
    return "\n".join(lines)


def _inputs(features: list[dict[str, Any]]) -> list[str]:
    """The inputs' table: each declared range, and beside it the observed one when the model keeps it."""
    observed = bool(features) and features[0]["observed_low"] is not None
    ranges = ["declared low", "declared high", "observed low", "observed high"] if observed else ["low", "high"]
    keys = ["low", "high", "observed_low", "observed_high"][: len(ranges)]
    return [
        f"| position | input | {' | '.join(ranges)} |",
        "|---|---|" + "---|" * len(ranges),
        *(f"| {f['position']} | {md_cell(f['name'])} | {' | '.join(f'{f[k]:g}' for k in keys)} |" for f in features),
    ]


def write(run_dir: RunDir) -> dict[str, Any]:
    """card.json and card.md in the run."""
    card = build(run_dir)
    run_dir.card_json.write_text(json.dumps(card, indent=2))
    run_dir.card_md.write_text(markdown(card))
    return card
