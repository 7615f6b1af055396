"""`monet-fast generate --latent-trace` and the demo's ready-to-run example command (tiny model)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from decode_helpers import K, decode_model
from PIL import Image

from monet_fast.cli import main
from monet_fast.decode import generate
from monet_fast.decode.cli import prompt_text
from monet_fast.model.loading import save_pretrained
from monet_fast.model.tokens import LATENT_END, LATENT_START

_STEP = re.compile(r"^  step (\d+): norm (\S+)  cos\(prev\) (\S+)$")


def _saved_model(tmp_path: Path) -> tuple[Path, object, object]:
    model, processor = decode_model("sft")
    save_pretrained(model, processor, tmp_path / "model")
    return tmp_path / "model", model, processor


def test_latent_trace_prints_norm_and_cosine_per_step(tmp_path, capsys):
    model_dir, model, processor = _saved_model(tmp_path)
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (30, 30, 200)).save(image)
    argv = ["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "Which?"]
    argv += ["--max-new-tokens", "8", "--start-latent", "--latent-trace"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{LATENT_START}⟨{K} latents⟩{LATENT_END}")
    lines = out.splitlines()
    head = lines.index(f"latent trace, block 1 ({K} steps):")
    steps = [_STEP.match(line) for line in lines[head + 1 : head + 1 + K]]
    assert all(steps), lines[head:]
    assert [int(m.group(1)) for m in steps] == list(range(1, K + 1))

    # The printed numbers are those of the latents the engine fed back for the same prompt.
    text = prompt_text(processor, [str(image)], "Which?", start_latent=True)
    ref = generate(
        model,
        processor,
        [{"text": text, "images": [Image.open(image)]}],
        max_new_tokens=8,
        return_latents=True,
    )
    vecs = ref.latents[0][0, : ref.latent_counts[0][0]].float()
    assert len(vecs) == K
    assert steps[0].group(3) == "-"  # no previous step in the block
    for k, m in enumerate(steps):
        assert float(m.group(2)) == float(f"{vecs[k].norm():.4g}")
        if k:
            cos = torch.nn.functional.cosine_similarity(vecs[k], vecs[k - 1], dim=0)
            assert abs(float(m.group(3)) - cos.item()) <= 5e-5

    # Without a latent block the trace says so.
    argv = ["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "Which?"]
    assert main(argv + ["--max-new-tokens", "2", "--max-latent-blocks", "0", "--latent-trace"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("latent trace: no latent block")


def test_demo_example_command_uses_the_task_prompt(tmp_path, capsys):
    from monet_fast.data import make_samples
    from monet_fast.demo import DEMO_TASK, Demo, DemoConfig
    from monet_fast.model.sequence import render_prompt

    model_dir, _, processor = _saved_model(tmp_path)
    demo = Demo(DemoConfig(out=tmp_path / "demo", max_new_tokens=6))
    demo.held_out = make_samples(1, seed=1000, config=DEMO_TASK)
    argv = demo.example(model_dir)
    printed = capsys.readouterr().out
    command = printed[printed.index("monet-fast generate") :].strip()
    assert shlex.split(command) == ["monet-fast", *argv]
    args = dict(zip(argv[1::2], argv[2::2]))
    assert Path(args["--image"]).is_file() and args["--model"] == str(model_dir)
    # `generate` renders the printed prompt exactly as training and eval render the sample.
    sample = demo.held_out[0]
    assert prompt_text(processor, [args["--image"]], args["--prompt"]) == render_prompt(sample)
    assert f"\\boxed{{{sample.answer}}}" in printed
    assert main(argv) == 0
    assert "latent trace" in capsys.readouterr().out
