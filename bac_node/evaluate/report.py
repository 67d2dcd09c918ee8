"""The evaluation report: one self-contained HTML page (``OUT/report.html``).

Every plot is a PNG (overlays: JPEG) embedded as a ``data:`` URI, the style sheet is
inline, nothing is fetched: the file can be mailed or opened offline. The first screen
holds the source study's table with our figures beside it; then the plots (Grade 3
ROC, grade confusion matrix, Bland-Altman of area %, per-vendor Jaccard, calcified
length against the true length and against area %), the strata
tables, the paired comparison, and example overlays (best, median and worst image of
each true grade, by per-image Jaccard) of the first model.

Overlay colours: green = BAC found (true positive), red = BAC missed (false negative),
cyan = false alarm (false positive). Masks are max-pooled when the image is shrunk, so
a one-pixel calcification stays visible.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bac_node.evaluate import paper
from bac_node.evaluate.metrics import GRADE_COUNT, PIXEL_METRICS
from bac_node.evaluate.run import Evaluation, ImageRecord, SourceResult

#: Overlay height in the report, in pixels.
OVERLAY_HEIGHT = 300
COLOURS = {"tp": (40, 220, 60), "fn": (255, 40, 40), "fp": (0, 220, 255)}
GRADE_NAMES = ("0 absent", "1 mild", "2 moderate", "3 severe")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def _ci(d: dict[str, Any], digits: int = 3, prefix: str = "") -> str:
    value = d.get(f"{prefix}value" if prefix else "value", d.get(prefix.rstrip("_")))
    low, high = d.get(f"{prefix}ci95_low"), d.get(f"{prefix}ci95_high")
    text = _fmt(value, digits)
    if low is not None and isinstance(low, float) and math.isfinite(low):
        text += f" <span class=ci>({_fmt(low, digits)} to {_fmt(high, digits)})</span>"
    return text


def _e(text: Any) -> str:
    return html.escape(str(text))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buffer.getvalue(), "image/png")


# --- plots --------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_plot(models: Sequence[dict[str, Any]]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    for model in models:
        g3 = model["strata"]["all"]["grades"]["grade3"]
        auc = g3["auc"].get("value")
        ax.step(g3["roc"]["fpr"], g3["roc"]["tpr"], where="post",
                label=f"{model['label']} (AUC {_fmt(auc)})")  # fmt: skip
        ax.plot(1 - g3["specificity"], g3["sensitivity"], "o", color="black")
    low, high = paper.GRADE3_AUC_RANGE
    ax.plot(1 - paper.GRADE3_SPECIFICITY, paper.GRADE3_SENSITIVITY, "s", color="grey",
            label=f"paper: sens {paper.GRADE3_SENSITIVITY}, spec {paper.GRADE3_SPECIFICITY}"
            f" (AUC {low}–{high})")  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title="Grade 3 detection from predicted area %")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    return _figure_uri(fig)


def confusion_plot(model: dict[str, Any]) -> str:
    plt = _pyplot()
    matrix = np.asarray(model["strata"]["all"]["grades"]["confusion_true_rows_predicted_columns"])
    fig, ax = plt.subplots(figsize=(4.0, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for t in range(GRADE_COUNT):
        for p in range(GRADE_COUNT):
            colour = "white" if matrix[t, p] > matrix.max() / 2 else "black"
            ax.text(p, t, str(matrix[t, p]), ha="center", va="center", color=colour)
    ax.set(xticks=range(GRADE_COUNT), yticks=range(GRADE_COUNT), xlabel="predicted grade",
           ylabel="reference grade", title="Study grades")  # fmt: skip
    return _figure_uri(fig)


def bland_altman_plot(result: SourceResult, model: dict[str, Any]) -> str:
    plt = _pyplot()
    true = np.array([t for s in result.studies for t, _ in s.sides.values()])
    predicted = np.array([p for s in result.studies for _, p in s.sides.values()])
    ba = model["strata"]["all"]["grades"]["area_percent_bland_altman_per_side"]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter((true + predicted) / 2, predicted - true, s=12, alpha=0.7)
    for key, style in (("bias", "-"), ("lower_loa", "--"), ("upper_loa", "--")):
        value = ba.get(key)
        if value is not None and math.isfinite(value):
            ax.axhline(value, linestyle=style, color="black", linewidth=0.8)
            ax.annotate(f"{key.replace('_', ' ')} {value:+.2f}", (1.0, value), xycoords=(
                "axes fraction", "data"), fontsize=7, ha="right", va="bottom")  # fmt: skip
    ax.set(xlabel="mean of reference and predicted area %",
           ylabel="predicted − reference (points of %)",
           title="Bland–Altman, BAC area % per breast")  # fmt: skip
    return _figure_uri(fig)


def vessel_plot(result: SourceResult, model: dict[str, Any]) -> str:
    """Per image: measured calcified length against the true one (when the set has it)
    and against the predicted area %."""
    plt = _pyplot()
    vessels = model.get("vessels", {})
    with_truth = [i for i in result.images if i.true_length_mm is not None]
    panels = 2 if with_truth else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8), squeeze=False)
    if with_truth:
        ax = axes[0][0]
        true = np.array([i.true_length_mm or 0.0 for i in with_truth])
        found = np.array([i.predicted_vessels.length_mm for i in with_truth])
        ax.scatter(true, found, s=12, alpha=0.7)
        top = float(max(true.max(initial=1.0), found.max(initial=1.0)))
        ax.plot([0, top], [0, top], ":", color="grey", linewidth=0.8)
        agreement = vessels.get("length_vs_true", {})
        ax.set(xlabel="true calcified length (mm)", ylabel="measured length (mm)",
               title=f"Length per image: Pearson {_fmt(agreement.get('pearson'), 2)}, "
               f"Spearman {_fmt(agreement.get('spearman'), 2)}")  # fmt: skip
        ax.title.set_fontsize(9)
    ax = axes[0][panels - 1]
    ax.scatter([i.predicted_burden.area_percent for i in result.images],
               [i.predicted_vessels.length_mm for i in result.images], s=12, alpha=0.7)  # fmt: skip
    against_area = vessels.get("length_vs_area_percent", {})
    ax.set(xlabel="predicted BAC area %", ylabel="measured length (mm)",
           title=f"Length and area % per image: Pearson "
           f"{_fmt(against_area.get('pearson'), 2)}, Spearman "
           f"{_fmt(against_area.get('spearman'), 2)}")  # fmt: skip
    ax.title.set_fontsize(9)
    return _figure_uri(fig)


def _vessel_note(model: dict[str, Any]) -> str:
    """One line of the length figures under the plots."""
    vessels = model.get("vessels", {})
    parts = []
    truth = vessels.get("length_vs_true")
    if truth:
        parts.append(
            f"measured − true length: bias {_fmt(truth['bias_mm'], 1)} mm, median |relative "
            f"error| {_fmt(truth['median_absolute_relative_error'], 3)}, within 10 % on "
            f"{_fmt(truth['within_10_percent'], 2)} of {truth['images_from_10_mm']} images "
            f"with ≥ 10 mm of true length"
        )
    count = vessels.get("vessel_count_vs_true")
    if count:
        parts.append(
            f"vessel count exact on {_fmt(count['exact'], 2)} of {count['images']} images "
            f"(mean difference {_fmt(count['mean_difference'], 2)})"
        )
    if not parts:
        return ""
    return (
        f"<p class=note><b>Vessels ({_e(model['label'])}).</b> " + "; ".join(parts) + ". "
        "Length is reported beside the grade; the grade stays area %.</p>"
    )


def vendor_plot(models: Sequence[dict[str, Any]]) -> str:
    plt = _pyplot()
    vendors = [k.split(" ", 1)[1] for k in models[0]["strata"] if k.startswith("vendor ")]
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    width = 0.8 / (2 * len(models))
    x = np.arange(len(vendors))
    bar = 0
    for model in models:
        for aggregation, hatch in (("per_image_mean", ""), ("pooled", "//")):
            values = [model["strata"][f"vendor {v}"][aggregation]["jaccard"] for v in vendors]
            values = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
            ax.bar(x + (bar - (2 * len(models) - 1) / 2) * width, values, width, hatch=hatch,
                   label=f"{model['label']}: {aggregation.replace('_', ' ')}")  # fmt: skip
            bar += 1
    ax.axhline(paper.PIXEL_TABLE[0][2] or 0, color="grey", linestyle=":", label="paper (all)")
    ax.set_xticks(x, [
        f"{v}\n{models[0]['strata'][f'vendor {v}']['images']} img" for v in vendors
    ], fontsize=7)  # fmt: skip
    ax.set(ylabel="Jaccard", ylim=(0, 1), title="Jaccard per vendor")
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    return _figure_uri(fig)


# --- overlays -----------------------------------------------------------------------


def _max_pool(mask: NDArray[np.bool_], factor: int) -> NDArray[np.bool_]:
    rows = math.ceil(mask.shape[0] / factor) * factor
    cols = math.ceil(mask.shape[1] / factor) * factor
    padded = np.zeros((rows, cols), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return np.asarray(padded.reshape(rows // factor, factor, cols // factor, factor).any((1, 3)))


def overlay(evaluation: Evaluation, record: ImageRecord) -> str:
    """A JPEG data URI of the image with found/missed/false BAC painted on it."""
    from bac_node.analysis import display
    from bac_node.dicom.reader import read_instance

    image = read_instance(evaluation.data.path(record.file))
    pixels = display(image)
    truth = evaluation.data.load_mask(record.bac_mask)
    with Image.open(evaluation.out / record.predicted_mask) as img:
        predicted = np.asarray(img.convert("1"), bool)
    factor = max(1, math.ceil(pixels.shape[0] / OVERLAY_HEIGHT))
    shape = (math.ceil(pixels.shape[0] / factor), math.ceil(pixels.shape[1] / factor))
    grey = Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).resize(
        (shape[1], shape[0]), Image.Resampling.BOX
    )
    rgb = np.stack([np.asarray(grey)] * 3, axis=-1)
    for name, mask in (("fp", ~truth & predicted), ("fn", truth & ~predicted),
                       ("tp", truth & predicted)):  # fmt: skip
        rgb[_max_pool(mask, factor)[: shape[0], : shape[1]]] = COLOURS[name]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def examples(result: SourceResult) -> dict[int, list[tuple[str, ImageRecord]]]:
    """Best, median and worst image (per-image Jaccard) of each true grade."""
    out: dict[int, list[tuple[str, ImageRecord]]] = {}
    for grade in range(GRADE_COUNT):
        ranked = sorted(
            (i for i in result.images if i.true_grade == grade),
            key=lambda i: (-i.example_score, i.sop_instance_uid),
        )
        if ranked:
            picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]),
                     ("worst", ranked[-1])]  # fmt: skip
            out[grade] = picks[: len(ranked)] if len(ranked) < 3 else picks
    return out


# --- the page -----------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#1b1f24;max-width:1240px}
h1{font-size:21px;margin:14px 0 2px}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ccd}
.sub{color:#555;margin:0 0 6px}.ruo{color:#a40000;font-weight:600}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:3px 9px;border-bottom:1px solid #e2e4e8;text-align:right;white-space:nowrap}
th{background:#f3f4f6;font-weight:600}td:first-child,th:first-child{text-align:left}
.ours{background:#eef6ff}.ci{color:#667;font-size:12px}
.note{color:#444;font-size:12.5px;max-width:1180px}
.cols{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}.plots img{max-width:100%}
figure{margin:0 8px 12px 0;display:inline-block;vertical-align:top}
figcaption{font-size:12px;color:#444;max-width:330px}
code{background:#f3f4f6;padding:1px 4px;border-radius:3px;font-size:12.5px}
.key span{display:inline-block;width:11px;height:11px;margin:0 4px 0 10px;vertical-align:middle}
"""


def _headline(doc: dict[str, Any]) -> str:
    models = doc["models"]
    rows = [
        "<tr><th rowspan=2>metric</th><th colspan=2>paper</th>"
        + "".join(f"<th class=ours colspan=2>{_e(m['label'])}</th>" for m in models)
        + "</tr><tr><th>baseline</th><th>semi-supervised</th>"
        + "<th class=ours>per-image mean</th><th class=ours>pooled</th>" * len(models)
        + "</tr>"
    ]
    for metric, baseline, semi in paper.PIXEL_TABLE:
        cells = (
            f"<td>{paper.PIXEL_NAMES[metric]}</td><td>{_fmt(baseline)}</td><td>{_fmt(semi)}</td>"
        )
        for m in models:
            s = m["strata"]["all"]
            if metric == "jaccard":
                mean = _ci(s["per_image_mean_jaccard_interval"])
                pooled = _ci(s["pooled_jaccard_interval"])
            else:
                mean, pooled = _fmt(s["per_image_mean"][metric]), _fmt(s["pooled"][metric])
            cells += f"<td class=ours>{mean}</td><td class=ours>{pooled}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _studies(n: int) -> str:
    return f" <span class=ci>{n} {'study' if n == 1 else 'studies'}</span>"


def _grade_headline(doc: dict[str, Any]) -> str:
    models = doc["models"]
    head = "<tr><th>metric</th><th>paper</th>" + "".join(
        f"<th class=ours>{_e(m['label'])}</th>" for m in models
    )
    rows = [head + "</tr>"]

    def row(name: str, reported: str, cells: list[str]) -> None:
        span = f" colspan={len(models)}" if len(cells) == 1 and len(models) > 1 else ""
        ours = "".join(f"<td class=ours{span}>{c}</td>" for c in cells)
        rows.append(f"<tr><td>{name}</td><td>{reported}</td>{ours}</tr>")

    gain = paper.JACCARD_GAIN
    if "comparison" in doc:
        c = doc["comparison"]["strata"]["all"]
        ours = [
            f"{_e(doc['comparison']['first'])} − {_e(doc['comparison']['second'])}: pooled "
            f"{_ci(c['pooled_jaccard_difference'], 4)} · per-image mean "
            f"{_ci(c['per_image_mean_jaccard_difference'], 4)}"
        ]
    else:
        ours = ["– (needs <code>--compare</code>)"]
    row(f"Jaccard gain (paired bootstrap by patient, {doc['settings']['resamples']:,})",
        f"{gain['value']} ({gain['ci95_low']} to {gain['ci95_high']}; "
        f"{gain['resamples']:,})", ours)  # fmt: skip
    grades = [m["strata"]["all"]["grades"] for m in models]
    row(f"quadratic weighted kappa (bootstrap, {doc['settings']['interval_resamples']:,})",
        _fmt(paper.KAPPA, 2), [_ci(g["quadratic_weighted_kappa"]) for g in grades])  # fmt: skip
    low, high = paper.GRADE3_AUC_RANGE
    row("Grade 3 AUC (from area %)", f"{low}–{high}", [_ci(g["grade3"]["auc"]) for g in grades])
    row("Grade 3 sensitivity (Wilson)", _fmt(paper.GRADE3_SENSITIVITY, 2),
        [_ci(g["grade3"], prefix="sensitivity_") + _studies(g["grade3"]["positives"])
         for g in grades])  # fmt: skip
    row("Grade 3 specificity (Wilson)", _fmt(paper.GRADE3_SPECIFICITY, 2),
        [_ci(g["grade3"], prefix="specificity_") + _studies(g["grade3"]["negatives"])
         for g in grades])  # fmt: skip
    g1 = [m["strata"].get("grade 1") for m in models]
    b1, s1 = paper.GRADE1_JACCARD
    row("grade 1 stratum Jaccard (per-image mean / pooled)", f"{_fmt(b1)} → {_fmt(s1)}", [
        f"{_fmt(s['per_image_mean']['jaccard'])} / {_fmt(s['pooled']['jaccard'])}"
        if s else "–" for s in g1
    ])  # fmt: skip
    return "<table>" + "".join(rows) + "</table>"


def _strata_tables(model: dict[str, Any]) -> str:
    pixels = ["<tr><th>stratum</th><th>images</th>"
              + "".join(f"<th>{paper.PIXEL_NAMES[m]}<br>mean / pooled</th>" for m in PIXEL_METRICS)
              + "</tr>"]  # fmt: skip
    grades = ["<tr><th>stratum</th><th>studies</th><th>exact grade</th><th>kappa (95 % CI)</th>"
              "<th>Grade 3 sensitivity</th><th>Grade 3 specificity</th><th>Grade 3 AUC</th>"
              "<th>area % bias (limits of agreement)</th></tr>"]  # fmt: skip
    for name, s in model["strata"].items():
        g = s["grades"]
        g3 = g["grade3"]
        ba = g["area_percent_bland_altman_per_side"]
        cells = [_e(name), str(s["images"])]
        cells += [f"{_fmt(s['per_image_mean'][m])} / {_fmt(s['pooled'][m])}" for m in PIXEL_METRICS]
        pixels.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        cells = [
            _e(name), str(s["studies"]), _fmt(g["exact_agreement"]),
            _ci(g["quadratic_weighted_kappa"]),
            f"{_fmt(g3['sensitivity'])} <span class=ci>of {g3['positives']}</span>",
            f"{_fmt(g3['specificity'])} <span class=ci>of {g3['negatives']}</span>",
            _fmt(g3["auc"].get("value")),
            f"{_fmt(ba['bias'], 2)} ({_fmt(ba['lower_loa'], 2)} to {_fmt(ba['upper_loa'], 2)})",
        ]  # fmt: skip
        grades.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<h3>Pixels (per-image mean / pooled)</h3><table>" + "".join(pixels) + "</table>"
        "<h3>Grades</h3><table>" + "".join(grades) + "</table>"
    )


def _comparison_table(doc: dict[str, Any]) -> str:
    c = doc["comparison"]
    rows = ["<tr><th>stratum</th><th>images</th><th>patients</th>"
            "<th>pooled Jaccard difference (95 % CI)</th>"
            "<th>per-image mean Jaccard difference (95 % CI)</th></tr>"]  # fmt: skip
    for name, s in c["strata"].items():
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{s['images']}</td><td>{s['patients']}</td>"
            f"<td>{_ci(s['pooled_jaccard_difference'], 4)}</td>"
            f"<td>{_ci(s['per_image_mean_jaccard_difference'], 4)}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _examples_html(evaluation: Evaluation, result: SourceResult) -> str:
    parts = []
    for grade, picks in examples(result).items():
        figures = []
        for which, record in picks:
            m = record.counts.metrics()
            caption = (
                f"<b>{which}</b> · {_e(record.vendor)} {record.laterality}-{record.view} · "
                f"Jaccard {_fmt(m['jaccard'])}, Dice {_fmt(m['dice'])} · area % true "
                f"{record.true_burden.area_percent:.2f}, predicted "
                f"{record.predicted_burden.area_percent:.2f} · "
                f"<span class=ci>{_e(record.sop_instance_uid)}</span>"
            )
            figures.append(
                f"<figure><img alt='{which} grade {grade} example' "
                f"src='{overlay(evaluation, record)}'><figcaption>{caption}</figcaption></figure>"
            )
        parts.append(f"<h3>True grade {GRADE_NAMES[grade]}</h3>" + "".join(figures))
    return "".join(parts)


def render_report(evaluation: Evaluation) -> Path:
    """Write ``OUT/report.html`` for ``evaluation``; its path."""
    doc, results = evaluation.doc, evaluation.results
    models = doc["models"]
    first = models[0]
    source = first["source"]
    data = doc["data"]
    title = f"bac-node evaluation: {first['label']}"
    if len(models) == 2:
        title += f" vs {models[1]['label']}"
    untrained = any(m["source"].get("untrained") for m in models)
    skipped = [(m["label"], n) for m in models for n in m["not_analysed"]]
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=sub>{data['studies']} studies, {data['patients']} patients, "
        f"{first['strata']['all']['images']} images from <code>{_e(data['path'])}</code> · "
        f"{_e(doc['tool'])}, {_e(doc['created'])} · model sha256 "
        f"<code>{_e(str(source.get('sha256', '–'))[:12])}</code> · "
        f"{_fmt(first['seconds_per_study'], 1)} s per study</p>",
        f"<p class=sub><code>{_e(doc['command'])}</code></p>" if doc["command"] else "",
        "<p class=ruo>Research use only. Not for clinical use.</p>",
        "<p class=ruo>An untrained model: its figures mean nothing.</p>" if untrained else "",
        "<h2>The source study's table, and ours</h2>",
        f"<div class=cols><div>{_headline(doc)}</div><div>{_grade_headline(doc)}</div></div>",
        f"<p class=note><b>Aggregation.</b> {_e(paper.AGGREGATION_NOTE)} Intervals: 95 %, "
        f"patient bootstrap (seed {doc['settings']['seed']}) unless named. Paper: "
        f"{_e(paper.SOURCE)}.</p>",
        "<h2>Plots</h2><div class=plots>",
        f"<figure><img alt='ROC' src='{roc_plot(models)}'></figure>",
        f"<figure><img alt='confusion matrix' src='{confusion_plot(first)}'></figure>",
        f"<figure><img alt='Bland-Altman' src='{bland_altman_plot(results[0], first)}'></figure>",
        f"<figure><img alt='per-vendor Jaccard' src='{vendor_plot(models)}'></figure>",
        f"<figure><img alt='calcified length' src='{vessel_plot(results[0], first)}'></figure>"
        "</div>",
        _vessel_note(first),
    ]
    for model in models:
        body.append(f"<h2>Strata: {_e(model['label'])}</h2>{_strata_tables(model)}")
    body.append(
        "<p class=note>Per grade: the true study grade. Kappa within one true grade has no "
        "meaning and is left out; per-image mean leaves out images where the metric is 0/0 "
        "(no BAC in truth nor prediction); '–': undefined in that stratum. "
        "Area % bias: predicted − reference per breast side, with the 95 % limits of "
        "agreement.</p>"
    )
    if "comparison" in doc:
        body.append(
            f"<h2>Paired comparison: {_e(doc['comparison']['first'])} − "
            f"{_e(doc['comparison']['second'])}</h2>{_comparison_table(doc)}"
        )
    body.append(
        f"<h2>Examples: {_e(first['label'])}</h2><p class='note key'>Best, median and worst "
        "image of each true grade by per-image Jaccard (1 when truth and prediction are both "
        "empty).<span style='background:rgb(40,220,60)'></span>found<span "
        "style='background:rgb(255,40,40)'></span>missed<span "
        "style='background:rgb(0,220,255)'></span>false alarm</p>"
        + _examples_html(evaluation, results[0])
    )
    if skipped:
        items = "".join(
            f"<li>{_e(label)}: study {_e(n['study'])}: {_e(n['input'])}: {_e(n['reason'])}</li>"
            for label, n in skipped
        )
        body.append(
            f"<h2>Inputs not analysed</h2><details><summary>{len(skipped)} inputs left out "
            "by the node's selection rules or unreadable (each with its reason)</summary>"
            f"<ul>{items}</ul></details>"
        )
    body.append(
        "<p class=note>Every number is in <code>metrics.json</code> and <code>metrics.csv"
        "</code> beside this page; per image and per study in <code>images.csv</code> and "
        "<code>studies.csv</code>.</p>"
    )
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = evaluation.out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
