"""PNG plots: loss curves, expert heatmaps, confusion matrices, comparisons. Headless (Agg backend)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def loss_curve(rows: list[dict], path: str, title: str, quality_keys=("val_acc", "val_f1")) -> str:
    """Left: train loss (per logged step, smoothed) and val loss against step. Right: val quality metrics."""
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    has_quality = any(k in r for r in evals for k in quality_keys)
    fig, axes = plt.subplots(1, 2 if has_quality else 1, figsize=(11 if has_quality else 6, 4))
    ax = axes[0] if has_quality else axes
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["train_loss"] for r in train], color="tab:blue", alpha=0.25, lw=0.8)
        sm = _smooth([r["train_loss"] for r in train])
        ax.plot(steps[len(steps) - len(sm):], sm, color="tab:blue", label="train loss (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (train: CE + aux; val: CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if has_quality:
        ax2 = axes[1]
        for k in quality_keys:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            if pts:
                ax2.plot(*zip(*pts), "o-", label=k.replace("_", " "))
        ax2.set_xlabel("step")
        ax2.set_ylabel("score")
        ax2.set_title("validation quality")
        ax2.grid(alpha=0.3)
        ax2.legend()
    return _save(fig, path)


def _heatmap(ax, matrix: np.ndarray, ylabels: list[str], title: str, ylabel: str):
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    E = matrix.shape[1]
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if matrix.size <= 200:
        for i in range(matrix.shape[0]):
            for j in range(E):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < matrix.max() * 0.6 else "black")
    plt.colorbar(im, ax=ax, fraction=0.046, label="share of tokens")


def expert_heatmap(layer_counts: np.ndarray, path: str, class_counts: np.ndarray | None = None,
                   class_names: list[str] | None = None, title: str = "expert load") -> str:
    """Per MoE layer x expert share of routed tokens; optionally per class x expert (summed over layers)."""
    layer_share = layer_counts / np.maximum(layer_counts.sum(1, keepdims=True), 1)
    panels = 2 if class_counts is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 1.2 + 0.5 * max(len(layer_share), 3)))
    axes = np.atleast_1d(axes)
    _heatmap(axes[0], layer_share, [f"MoE layer {i}" for i in range(len(layer_share))],
             f"{title}: tokens per expert", "layer")
    if class_counts is not None:
        class_share = class_counts / np.maximum(class_counts.sum(1, keepdims=True), 1)
        _heatmap(axes[1], class_share, class_names, "tokens per expert by true class (all layers)", "class")
    return _save(fig, path)


def _cjk_font() -> str | None:
    """A font that has Chinese glyphs, if one is installed (matplotlib's default DejaVu has none)."""
    from matplotlib import font_manager
    wanted = ("Noto Sans CJK", "Noto Serif CJK", "WenQuanYi", "Source Han", "SimHei", "Microsoft YaHei",
              "PingFang", "Heiti", "AR PL")
    for f in font_manager.fontManager.ttflist:
        if any(w in f.name for w in wanted):
            return f.name
    return None


def lm_expert_heatmap(layer_share: np.ndarray, tokens: list[str], token_experts: np.ndarray, path: str,
                      layer_names: list[str] | None = None) -> str:
    """Top: layer x expert share of tokens, averaged over training. Bottom: for one sample sentence, the
    top-1 expert of every token in every MoE layer it passes (colour = expert id)."""
    font = _cjk_font()
    L, E = layer_share.shape
    names = layer_names or [f"MoE layer {i}" for i in range(L)]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.32 * len(tokens) + 2), 2.5 + 0.45 * L * 2),
                             gridspec_kw={"height_ratios": [L + 1, L + 1]})
    _heatmap(axes[0], layer_share, names, "share of tokens per expert over training",
             "layer")
    ax = axes[1]
    cmap = plt.get_cmap("tab10" if E <= 10 else "tab20", E)
    # -1: the token went to no expert (expert choice): left blank
    im = ax.imshow(np.ma.masked_less(token_experts, 0), aspect="auto", cmap=cmap, vmin=-0.5, vmax=E - 0.5)
    if font:
        ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], fontfamily=font, fontsize=8)
        ax.set_xlabel("token of a test sentence")
    else:  # no CJK font: label positions (install fonts-noto-cjk to see the characters)
        ax.set_xticks(range(len(tokens)))
        ax.set_xlabel("token position in a test sentence (install a CJK font, e.g. fonts-noto-cjk, for text)")
    ax.set_yticks(range(len(token_experts)), names[:len(token_experts)])
    ax.set_title("top-1 expert chosen for each token")
    plt.colorbar(im, ax=ax, ticks=range(E), fraction=0.046, label="expert")
    return _save(fig, path)


def confusion_matrix_png(cm: np.ndarray, names: list[str], path: str, title: str = "confusion matrix") -> str:
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1 + 0.8 * len(names)))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    plt.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def compare_curves(runs: dict[str, list[dict]], path: str, key: str = "val_acc") -> str:
    """One line per variant: a validation metric against training seconds (equal wall-clock comparison)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in runs.items():
        pts = [(r["time"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{key.replace('_', ' ')} against wall-clock")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _panels(n: int, width: float, height: float):
    """A figure with n panels, at most 3 a row; returns (fig, flat axes list)."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def routing_report(layers: list[dict], num_experts: int, out_dir: str, pair_shares: dict) -> dict:
    """The PNGs of `main.py --analyze` (analyze.py) from its per-layer summaries: expert share by token kind,
    by predicted class (classifier), top-k co-occurrence, and the load with router entropy. {key: path}."""
    import os
    E, n = num_experts, len(layers)
    out = {}
    fig, axes = _panels(n, 5.5, 1.4 + 0.45 * max(len(l["by_kind"]) for l in layers))
    for ax, layer in zip(axes, layers):
        kinds = list(layer["by_kind"])
        matrix = np.array([layer["by_kind"][k]["share"] for k in kinds])
        _heatmap(ax, matrix, [f"{k} ({layer['by_kind'][k]['tokens']:,})" for k in kinds],
                 f"{layer['layer']}: experts by token kind", "token kind (tokens)")
    out["by_kind_png"] = _save(fig, os.path.join(out_dir, "routing_by_kind.png"))
    if "by_class" in layers[0]:
        fig, axes = _panels(n, 5.5, 1.4 + 0.45 * max(len(layers[0]["by_class"]), 2))
        for ax, layer in zip(axes, layers):
            names = list(layer["by_class"])
            _heatmap(ax, np.array([layer["by_class"][c] for c in names]), names,
                     f"{layer['layer']}: experts by predicted class", "class")
        out["by_class_png"] = _save(fig, os.path.join(out_dir, "routing_by_class.png"))
    fig, axes = _panels(n, 4.8, 4.2)
    for ax, layer in zip(axes, layers):
        im = ax.imshow(pair_shares[layer["layer"]], cmap="magma", vmin=0)
        ax.set_xticks(range(E))
        ax.set_yticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.set_title(f"{layer['layer']}: share of tokens\nwith both experts in their top-k", fontsize=9)
        plt.colorbar(im, ax=ax, fraction=0.046)
    out["cooccurrence_png"] = _save(fig, os.path.join(out_dir, "routing_cooccurrence.png"))
    fig, axes = _panels(n, 4.5, 3.2)
    for ax, layer in zip(axes, layers):
        ax.bar(range(E), layer["load_share"], color="tab:blue")
        ax.axhline(1 / E, color="gray", ls="--", lw=1, label="uniform")
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments")
        ax.set_title(f"{layer['layer']}: load CV {layer['load_cv']:.2f}, router entropy "
                     f"{layer['entropy']:.2f} / {layer['entropy_max']:.2f} nats", fontsize=9)
        ax.legend(fontsize=8)
    out["load_png"] = _save(fig, os.path.join(out_dir, "routing_load.png"))
    return out


def scale_plot(rows: list[dict], path: str) -> str:
    """bench.py --only scale: seconds and megabytes against corpus size, log-log."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for task, style in (("lm", "o-"), ("cls", "s--")):
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        mb = [r["mb"] for r in mine]
        for key, label in (("tokenizer_s", "tokenizer (on its sample)"), ("cold_first_step_s", "first step, cold"),
                           ("cached_first_step_s", "first step, cached")):
            left.plot(mb, [r[key] for r in mine], style, label=f"{task}: {label}")
        for key, label in (("peak_rss_mb_cold", "peak RSS, preparing + training"),
                           ("peak_rss_mb_cached", "peak RSS, training on what was prepared")):
            right.plot(mb, [r[key] for r in mine], style, label=f"{task}: {label}")
    right.set_ylabel("MB")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus (MB of text)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("the data paths against corpus size (lm: text file; cls: labelled csv)")
    return _save(fig, path)
