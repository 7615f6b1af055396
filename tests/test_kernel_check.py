"""`monet-fast check-kernels` (monet_fast/kernel_check.py) and the tile table (kernels/tiles.py).

The compile tests build real cubins for GPU targets with Triton's bundled ptxas (no GPU
needed); the command re-runs itself without TRITON_INTERPRET, which conftest sets.
"""

from __future__ import annotations

import json

import pytest
from monet_fast.kernels import tiles

from monet_fast.cli import main as cli_main

ROW_KEYS = {"kernel", "arch", "dtype", "head_dim", "shared_bytes", "shared_limit", "fits"}
ATTENTION_KERNELS = {
    "latent_attention_forward",
    "latent_attention_backward_dkdv",
    "latent_attention_backward_dq",
    "latent_attention_backward_preprocess",
}
LOGPROB_KERNELS = {
    "gaussian_logprob_forward",
    "latent_policy_loss_forward",
    "gaussian_logprob_backward",
}


def _check(tmp_path, *args: str) -> tuple[int, list[dict]]:
    path = tmp_path / "kernels.json"
    rc = cli_main(["check-kernels", "--json", str(path), *args])
    return rc, json.loads(path.read_text()) if path.exists() else []


# --- the tile table (no compilation) --------------------------------------------------------


def test_every_advertised_combination_has_tiles():
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "interpreter"):
        for dtype in tiles.DTYPES:
            for head_dim in (1, 8, 16, 64, 80, 96, 128, 256):
                cfg = tiles.tile_config("latent_attention", dtype, head_dim, arch)
                assert min(cfg.fwd_m, cfg.fwd_n, cfg.dkdv_m, cfg.dq_n) >= 16  # tl.dot M, N >= 16
            rows = tiles.tile_config("gaussian_logprob", dtype, 3584, arch)
            assert rows.block_d == 4096


def test_tiles_depend_on_dtype_and_arch_family():
    bf16 = tiles.tile_config("latent_attention", "bf16", 128, "sm_90")
    fp32 = tiles.tile_config("latent_attention", "fp32", 128, "sm_90")
    assert fp32.fwd_m * fp32.fwd_n < bf16.fwd_m * bf16.fwd_n
    assert tiles.arch_family("sm_89") == tiles.arch_family("sm_86") == "sm86"
    assert tiles.arch_family("sm_80") == "sm80" and tiles.arch_family("9.0") == "sm90"
    # 80 and 96 share the 128 tiles (BLOCK_D = 128); < 16 is padded to 16.
    assert tiles.block_d(80) == tiles.block_d(96) == 128 and tiles.block_d(3) == 16
    assert tiles.row_launch(16384, 3584, "bf16", "sm_90") == (1, 4096, 8)
    assert tiles.row_launch(100000, 7, "fp16", "sm_90") == (256, 16, 8)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: tiles.block_d(0), r"head_dim must be in \[1, 256\], got 0"),
        (lambda: tiles.block_d(300), r"got 300"),
        (lambda: tiles.parse_arch("sm_75"), r"unsupported GPU arch 'sm_75'.*sm_80"),
        (lambda: tiles.normalize_dtype("int8"), r"dtype must be one of .*got 'int8'"),
        (lambda: tiles.tile_config("softmax", "bf16", 64, "sm_90"), r"kernel must be one of"),
    ],
)
def test_tile_table_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- compiling for GPU targets --------------------------------------------------------------


@pytest.mark.slow
def test_check_kernels_sm80_sm90_every_variant_fits(tmp_path):
    """make test's run of the command for sm_80 and sm_90: every kernel and dtype at head_dim 80
    (BLOCK_D = 128 with masking: the tiles, and so the shared memory, of head_dim 128 too) and
    the 7B row width. The full matrix (also 64, 128, more widths, sm_89) is the CLI's default,
    ~9 min of compiling on 2 busy cores, too slow for the suite."""
    rc, rows = _check(tmp_path, "--arch", "sm_80,sm_90", "--head-dim", "80", "--hidden-size", "3584")  # fmt: skip
    assert rc == 0, [r for r in rows if not r["fits"]]
    expected = {
        (k, a, d, 80 if k in ATTENTION_KERNELS else 3584)
        for a in ("sm_80", "sm_90")
        for d in ("bf16", "fp16", "fp32")
        for k in ATTENTION_KERNELS | LOGPROB_KERNELS
    }
    assert {(r["kernel"], r["arch"], r["dtype"], r["head_dim"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert isinstance(r["shared_bytes"], int) and isinstance(r["registers"], int)
        assert r["shared_limit"] == tiles.SHARED_LIMITS[int(r["arch"][3:])]
        assert r["fits"] is True and r["shared_bytes"] <= r["shared_limit"]
        assert r["registers"] <= 255 and r["spills"] >= 0
        assert r["tiles"]["BLOCK_D"] == (128 if r["kernel"] in ATTENTION_KERNELS else 4096)


@pytest.mark.slow
def test_sm89_16bit_tiles_fit(tmp_path):
    """sm_86 / sm_89 (99 KB per block) get their own 16-bit tiles at head_dim 128."""
    rc, rows = _check(
        tmp_path, "--arch", "sm_89", "--dtype", "bf16", "--head-dim", "80", "--kernel", "latent_attention",
    )  # fmt: skip
    assert rc == 0 and len(rows) == 4 and all(r["fits"] for r in rows), rows


@pytest.mark.slow
def test_oversized_tiles_are_reported_as_not_fitting(tmp_path):
    """The sm_90 16-bit tiles forced onto sm_89 (the old arch-blind table): the dK/dV pass
    needs 105 KB of the 99 KB there, so its row says fits=false and the command exits 1."""
    old_tiles = "fwd_m=128,fwd_n=64,dkdv_m=64,dkdv_n=64,dq_m=128,dq_n=32,num_warps=8,num_stages=3"
    rc, rows = _check(
        tmp_path, "--arch", "sm_89", "--dtype", "bf16", "--head-dim", "128",
        "--kernel", "latent_attention", "--tiles", old_tiles,
    )  # fmt: skip
    assert rc == 1
    dkdv = next(r for r in rows if r["kernel"] == "latent_attention_backward_dkdv")
    assert dkdv["fits"] is False and dkdv["shared_bytes"] > dkdv["shared_limit"] == 101376


@pytest.mark.slow
def test_small_head_dim_compiles_padded(tmp_path):
    """head_dim 8 is padded to BLOCK_D = 16: without it tl.dot (K >= 16) fails to compile."""
    rc, rows = _check(
        tmp_path, "--arch", "sm_80", "--dtype", "fp16", "--head-dim", "8",
        "--kernel", "latent_attention",
    )  # fmt: skip
    assert rc == 0, rows
    assert {r["tiles"]["BLOCK_D"] for r in rows} == {16}


def test_bad_arguments_give_a_clear_error(capsys):
    assert cli_main(["check-kernels", "--arch", "sm_75"]) == 2
    assert "unsupported GPU arch 'sm_75'" in capsys.readouterr().err
