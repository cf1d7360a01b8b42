"""Paper-scale MACs: the real SD3-medium, PixArt-Sigma and FLUX.1-dev configs on the meta device."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from flux_macs import analytic_flux_macs

from catbatch.cli import main
from catbatch.metrics import paper_configs
from catbatch.metrics.paper_configs import FLUX_1_DEV, PAPER_MODELS, paper_macs_table


@pytest.fixture(scope="module")
def table():
    rows = paper_macs_table(("sd3-medium", "pixart-sigma"), (28, 50), alpha=0.3)
    return {(r.model, r.variant, r.steps): r for r in rows}


@pytest.mark.parametrize("model", ["SD3-medium", "PixArt-Sigma"])
@pytest.mark.parametrize("steps", [28, 50])
def test_meta_figures_match_the_paper(table, model, steps):
    spec = next(s for s in PAPER_MODELS.values() if s.name == model)
    full, cat = table[(model, "full", steps)], table[(model, "cat", steps)]
    assert full.paper_t == pytest.approx(spec.paper_macs[("full", steps)], rel=0.005)
    assert cat.paper_t == pytest.approx(spec.paper_macs[("cat", steps)], rel=0.01)
    assert full.reference_t == spec.paper_macs[("full", steps)]
    assert full.total_t > full.paper_t and cat.total_t > cat.paper_t
    assert cat.total_t < full.total_t
    if spec.family == "pixart":  # recomputing text K/V at full steps is the paper's figure
        assert cat.as_paper_t == pytest.approx(spec.paper_macs[("cat", steps)], rel=0.002)
        assert cat.as_paper_t > cat.paper_t


def test_full_macs_scale_with_steps(table):
    for model in ("SD3-medium", "PixArt-Sigma"):
        f28, f50 = table[(model, "full", 28)], table[(model, "full", 50)]
        assert f50.paper_t == pytest.approx(f28.paper_t * 50 / 28, rel=1e-12)


def test_real_configs_are_the_published_ones():
    sd3 = PAPER_MODELS["sd3-medium"].build("meta")
    assert len(sd3.transformer_blocks) == 24 and sd3.inner_dim == 24 * 64
    assert sd3.config.pos_embed_max_size == 192 and sd3.config.pooled_projection_dim == 2048
    pixart = PAPER_MODELS["pixart-sigma"].build("meta")
    assert len(pixart.transformer_blocks) == 28 and pixart.inner_dim == 16 * 72
    assert pixart.config.out_channels == 8 and not pixart.use_additional_conditions
    assert PAPER_MODELS["sd3-medium"].text_tokens == 333
    assert PAPER_MODELS["pixart-sigma"].text_tokens == 300


def test_cli_prints_the_table(table, monkeypatch):
    rows = list(table.values())
    monkeypatch.setattr(paper_configs, "paper_macs_table", lambda *a, **k: rows)
    res = CliRunner().invoke(main, ["macs"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    sd3_28 = next(line for line in lines if line.startswith("SD3-medium") and " 28 full" in line)
    assert f"{table[('SD3-medium', 'full', 28)].paper_t:.2f}" in sd3_28 and "168.28" in sd3_28
    assert "linear layers + patch-embedding" in res.output and "333 text tokens" in res.output
    res = CliRunner().invoke(main, ["macs", "--json"])
    data = json.loads(res.output)
    assert len(data["rows"]) == 8 and all(abs(r["diff_pct"]) < 1 for r in data["rows"])
    res = CliRunner().invoke(main, ["macs", "--alpha", "0"])
    assert res.exit_code == 2 and "--alpha" in res.output


# -- FLUX.1-dev: full and CAT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_table():
    return paper_macs_table(("flux1-dev",), (28, 50), alpha=0.3)


def test_flux_counts_equal_the_analytic_formula(flux_table):
    full = analytic_flux_macs(FLUX_1_DEV, n_img=4096, n_txt=512)  # 1024px: 64x64 packed tokens
    pruned = analytic_flux_macs(FLUX_1_DEV, n_img=4096, n_txt=512, k=1228)  # full-length stream
    assert [(r.variant, r.steps) for r in flux_table] == [
        ("full", 28),
        ("cat", 28),
        ("full", 50),
        ("cat", 50),
    ]
    for r in flux_table:
        n_full, n_pruned = (r.steps, 0) if r.variant == "full" else (8, r.steps - 8)
        paper = n_full * full["paper"] + n_pruned * pruned["paper"]
        total = n_full * sum(full.values()) + n_pruned * sum(pruned.values())
        assert r.paper_t * 1e12 == pytest.approx(paper, rel=1e-12)
        assert r.total_t * 1e12 == pytest.approx(total, rel=1e-12)
        assert r.reference_t is None and r.as_paper_t is None
    # about 12B parameters x 4608 tokens per step, plus attention
    assert 29.7 < flux_table[0].paper_t / 28 < 29.8 and 37.1 < flux_table[0].total_t / 28 < 37.3
    cat28, cat50 = flux_table[1], flux_table[3]
    assert cat28.ceiling_total == pytest.approx(flux_table[0].total_t / cat28.total_t)
    assert cat28.ceiling_paper == pytest.approx(flux_table[0].paper_t / cat28.paper_t)
    assert 1.75 < cat28.ceiling_total < 1.85 and 2.0 < cat50.ceiling_total < 2.15


def test_flux_config_is_the_published_one():
    flux = PAPER_MODELS["flux1-dev"].build("meta")
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert flux.inner_dim == 24 * 128 and flux.config.guidance_embeds
    params = sum(p.numel() for p in flux.parameters())
    assert 11.8e9 < params < 12.0e9  # "12B"
    assert PAPER_MODELS["flux1-dev"].text_tokens == 512


def test_flux_table_prints_cat_rows_and_their_ceiling(flux_table, monkeypatch):
    calls = []

    def table(*args, **kwargs):
        calls.append(args)
        return flux_table

    monkeypatch.setattr(paper_configs, "paper_macs_table", table)
    res = CliRunner().invoke(main, ["macs", "--model", "flux1-dev"])
    assert res.exit_code == 0, res.output
    assert calls[0][0] == ("flux1-dev",)
    lines = res.output.splitlines()
    full = next(x for x in lines if x.startswith("FLUX.1-dev") and " 28 full" in x)
    assert f"{flux_table[0].paper_t:.2f}" in full and f"{flux_table[0].total_t:.2f}" in full
    cat = next(x for x in lines if x.startswith("FLUX.1-dev") and " 28 cat a=0.3" in x)
    r = flux_table[1]
    assert f"{r.paper_t:.2f}" in cat and f"{r.ceiling_paper:.2f}x / {r.ceiling_total:.2f}x" in cat
    assert "not available" not in res.output and "FLUX.1-dev (not in the paper)" in res.output
    CliRunner().invoke(main, ["macs"])
    assert calls[1][0] == ("sd3-medium", "pixart-sigma", "flux1-dev")  # the default: all three
