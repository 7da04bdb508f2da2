"""DDP on mixed data with transformers' own Higgs Audio v2: torchrun, 2 gloo ranks, one batch without audio.

Rank 1's first batch has no audio (text labels only): ``embed_audio_tokens`` and ``audio_lm_head`` take
no part in its graph. With ``ddp_find_unused_parameters=False`` (and under gradient checkpointing) the
ranks then wait for each other forever, unpatched; patched (native-every-parameter) every setting
finishes with bitwise-equal weights on both ranks. Launched as test_ddp launches boson's, killed whole
if it outlives its timeout.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

pytest.importorskip("transformers.models.higgs_audio_v2", reason="transformers' own Higgs Audio v2 ships from 5.3")

from launch import TIMEOUT, results, torchrun  # noqa: E402

pytestmark = [pytest.mark.core, pytest.mark.native]

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, tempfile
    import torch, torch.distributed as dist

    signal.alarm(int(sys.argv[4]))  # a rank that hangs ends itself, whatever became of its launcher
    import higgs_patch
    if sys.argv[3] == "patched":
        higgs_patch.apply()
    from higgs_patch.commands import tiny_native
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    proc = tiny_native.processor()
    VOICE = "say hello <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
    def voice(seed): return dict(tiny_native.batch(proc, [VOICE], [3 + seed], seed=seed))
    def text(): return dict(tiny_native.batch(proc, ["say hello world please"], []))
    DATA = [voice(0), text(), voice(1), voice(2)]  # rank 0 takes 0 and 2, rank 1 takes 1 (no audio) and 3

    class InOrder(Trainer):
        def _get_train_sampler(self, *args):
            return SequentialSampler(self.train_dataset)

    rank = int(os.environ["RANK"])
    for name, settings in json.loads(sys.argv[2]).items():
        model = tiny_native.model()
        args = TrainingArguments(**{**dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=2,
                                           learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                           remove_unused_columns=False, disable_tqdm=True, ddp_backend="gloo"),
                                    **settings})
        trainer = InOrder(model=model, args=args, train_dataset=DATA, data_collator=lambda features: features[0])
        try:
            trainer.train()
            result = {"state": {k: v.detach() for k, v in model.state_dict().items()}}
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        torch.save(result, os.path.join(sys.argv[1], f"{name}.rank{rank}.pt"))
        dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
""")

CASES = {
    "find_unused_parameters=False": {"ddp_find_unused_parameters": False},
    "checkpointing (reentrant), find_unused_parameters=False": {
        "gradient_checkpointing": True, "ddp_find_unused_parameters": False},
    "checkpointing (non-reentrant), find_unused_parameters=False": {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False},
}


def test_unpatched_a_batch_without_audio_hangs_the_ranks(tmp_path):
    done = torchrun(tmp_path, SCRIPT, {"find_unused_parameters=False": CASES["find_unused_parameters=False"]},
                    patched=False, timeout=45)
    assert done is None or done.returncode != 0  # killed after its timeout, or failed: never finished


def test_patched_every_setting_finishes_on_mixed_data_with_equal_ranks(tmp_path):
    done = torchrun(tmp_path, SCRIPT, CASES)
    assert done is not None, f"the ranks did not finish within {TIMEOUT} s"
    assert done.returncode == 0, done.stdout[-4000:]
    for case in CASES:
        ranks = results(tmp_path, case)
        assert all("error" not in r for r in ranks), (case, [r.get("error") for r in ranks])
        for name, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][name]), f"{case}: {name} differs between ranks"
