"""The GPU checks of issues 3, 5, 6, 7, 11 and 18, as one prepared script for a lent GPU machine.

    python benchmarks/gpu_checks.py [--device cuda] [--quick] [--json PATH]

1. collate: the patched collator with audio codes on the device, then one training step of the tiny
   model on the device, by hand and with the transformers Trainer (issue 3);
2. bf16: a bf16 full fine-tune and a LoRA fine-tune of the tiny model under the Trainer (``bf16=True``:
   accelerate's autocast rebinds the model's forward), losses finite and falling, every step's loss
   made by the patched forward from ``labels`` alone, every default patch applied (issue 18);
3. spawn: a DataLoader with ``spawn`` workers over samples whose codes live on the device, batches
   equal to ``num_workers=0`` (issue 5);
4. loss: the loss hook against plain ``F.cross_entropy`` at 1 x 4,096 x 128,256 in bf16, time and
   peak memory from ``torch.cuda.max_memory_allocated`` (issue 6);
5. sparse: one training step of a tiny model with the real vocabulary, 2,048 positions, 2% supervised
   text, dense against ``sparse-text-logits``, in bf16 (issue 7);
6. released: the released config at 28 layers (random init, bf16), LoRA r 16 on attention, MLP and
   audio MLP, one sample of 4,096 positions: plain, gradient checkpointing, sparse-text-logits, both;
   peak from ``torch.cuda.max_memory_allocated`` and step time, beside the memory model's prediction
   (issue 11).

``--device cpu --quick`` runs the same code paths on small shapes, to check the script itself.
Prints one JSON document (also written to --json) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import higgs_patch
from higgs_patch.commands import tiny

HERE = os.path.dirname(os.path.abspath(__file__))


def on(device: str, batch: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_collate(device: str) -> dict:
    higgs_patch.apply()
    samples = tiny.samples(4, device=device)
    batch = tiny.DictCollator(tiny.collator())(samples)
    codes_device = str(batch["audio_out_ids"].device)
    model = tiny.model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = on(device, batch)
    result = higgs_patch.higgs_audio_loss(model(**inputs), inputs)
    result.loss.backward()
    optimizer.step()

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=os.path.join(HERE, "results", "gpu-trainer"), use_cpu=device == "cpu",
                             max_steps=3, per_device_train_batch_size=2, report_to=[], save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=tiny.model(), args=args, train_dataset=samples,
                      data_collator=tiny.DictCollator(tiny.collator()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ok = codes_device.startswith(device) and bool(torch.isfinite(result.loss)) and all(l == l for l in losses)
    return {"ok": ok, "codes_on": codes_device, "step_loss": float(result.loss), "trainer_losses": losses,
            "trainer_device": str(trainer.args.device)}


SPAWN = """
import json, sys, torch
from torch.utils.data import DataLoader
from higgs_patch.commands import tiny

def batches(workers, device):
    loader = DataLoader(tiny.samples(8, device=device), batch_size=2, num_workers=workers,
                        collate_fn=tiny.collator(), multiprocessing_context="spawn" if workers else None)
    return [{k: v.cpu() for k, v in tiny.fields(b).items() if isinstance(v, torch.Tensor)} for b in loader]

if __name__ == "__main__":
    import higgs_patch
    higgs_patch.apply()
    device = sys.argv[1]
    spawned, inline = batches(2, device), batches(0, device)
    same = all(torch.equal(a[k], b[k]) for a, b in zip(spawned, inline) for k in a)
    print(json.dumps({"batches": len(spawned), "same": same}))
"""


def check_spawn(device: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    done = subprocess.run([sys.executable, "-c", SPAWN, device], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-2000:]}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ok": found["same"] and found["batches"] == 4, **found}


def measured(device: str, run) -> tuple[float, float | None, float]:
    """Seconds (median of 5 after a warm-up), peak memory growth in MiB (CUDA only), and the value."""
    run()
    cuda = device.startswith("cuda")
    times, value = [], None
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return sorted(times)[2], peak, value


def check_loss(device: str, quick: bool) -> dict:
    sys.path.insert(0, HERE)
    import loss_bench

    shape = dict(batch=1, tokens=256 if quick else 4096, vocab=4096 if quick else 128_256,
                 audio_tokens=64 if quick else 500, codebooks=8, codebook_vocab=1026)
    x = loss_bench.make_inputs(**shape)
    dtype = torch.bfloat16
    x.logits = x.logits.detach().to(device, dtype).requires_grad_()
    x.audio_logits = x.audio_logits.detach().to(device, dtype).requires_grad_()
    x.labels, x.audio_labels = x.labels.to(device), x.audio_labels.to(device)

    def variant(function):
        def run():
            x.clear_grads()
            loss = function(x)
            loss.backward()
            return float(loss)
        return run

    found = {name: measured(device, variant(loss_bench.VARIANTS[name])) for name in ("reference", "hook")}
    (t_ref, m_ref, v_ref), (t_hook, m_hook, v_hook) = found["reference"], found["hook"]
    return {
        "ok": t_hook <= 1.3 * t_ref and (m_ref is None or m_hook <= 1.15 * m_ref) and abs(v_hook - v_ref) <= 1e-2 * abs(v_ref),
        "shape": shape, "dtype": "bfloat16", "time_ms": {"reference": t_ref * 1e3, "hook": t_hook * 1e3},
        "time_ratio": t_hook / t_ref, "peak_mib": {"reference": m_ref, "hook": m_hook},
        "memory_ratio": None if m_ref is None else m_hook / m_ref, "loss": {"reference": v_ref, "hook": v_hook},
    }


def check_sparse(device: str, quick: bool) -> dict:
    sys.path.insert(0, HERE)
    import sparse_bench

    higgs_patch.apply()
    vocab = 8192 if quick else sparse_bench.VOCAB
    net = tiny.model(text_config={**tiny.config().text_config.to_dict(), "vocab_size": vocab})
    net = net.to(device, torch.bfloat16).train()
    inputs = on(device, sparse_bench.batch())
    found = {name: measured(device, lambda patches=patches: sparse_bench.step(net, inputs, patches))
             for name, patches in sparse_bench.VARIANTS.items()}
    (t_dense, m_dense, v_dense), (t_sparse, m_sparse, v_sparse) = found["dense"], found["sparse"]
    return {
        "ok": t_sparse <= t_dense and (m_dense is None or m_sparse * 5 <= m_dense) and abs(v_sparse - v_dense) <= 2e-2 * abs(v_dense),
        "vocab": vocab, "dtype": "bfloat16", "time_ms": {"dense": t_dense * 1e3, "sparse": t_sparse * 1e3},
        "time_ratio": t_sparse / t_dense, "peak_mib": {"dense": m_dense, "sparse": m_sparse},
        "memory_ratio": None if m_dense is None else m_sparse / m_dense, "loss": {"dense": v_dense, "sparse": v_sparse},
    }


class _ChecksTheLoss:
    """Mixed into a Trainer: records, per step, that the patched forward made the loss (issue 18)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        expected = higgs_patch.higgs_audio_loss(outputs, inputs).loss
        self.reached.append(outputs.get("expanded_labels") is not None and outputs.get("llm_loss") is not None
                            and abs(loss.item() - expected.item()) <= 2e-3 * abs(expected.item()))
        return (loss, outputs) if return_outputs else loss


def check_bf16(device: str, quick: bool) -> dict:
    """A bf16 full fine-tune and LoRA of the tiny model under the Trainer (accelerate's autocast path):
    losses finite and falling, every step's loss made by the patched forward from ``labels`` alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    class Checked(_ChecksTheLoss, Trainer):
        pass

    def labels_only(batch):
        out = tiny.DictCollator(tiny.collator())(batch)
        del out["label_ids"]
        return out

    from accelerate.state import AcceleratorState

    higgs_patch.apply()
    steps, found = (8 if quick else 40), {}
    AcceleratorState._reset_state(reset_partial_state=True)  # the collate check's Trainer made one without bf16
    for kind in ("full", "lora"):
        model = tiny.model()
        if kind == "lora":
            model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=os.path.join(HERE, "results", f"gpu-bf16-{kind}"), use_cpu=device == "cpu",
                                 bf16=True, max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
                                 report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                                 logging_steps=1, seed=0)
        trainer = Checked(model=model, args=args, train_dataset=tiny.samples(16), data_collator=labels_only)
        trainer.reached = []
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        states = {s.id: s.state for s in higgs_patch.status() if s.default}
        third = max(1, len(losses) // 3)
        found[kind] = {
            "ok": len(losses) == steps and all(l == l and abs(l) != float("inf") for l in losses)
            and sum(losses[-third:]) < sum(losses[:third]) and len(trainer.reached) == steps and all(trainer.reached)
            and set(states.values()) == {"applied"},
            "first_loss": losses[0], "last_loss": losses[-1], "steps_reaching_the_patches": sum(trainer.reached),
            "autocast_rebound_forward": "forward" in vars(trainer.accelerator.unwrap_model(trainer.model)),
            "device": str(trainer.args.device), "states": states,
        }
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # TrainingArguments(bf16=True) leaves it for later Trainers
    return {"ok": all(v["ok"] for v in found.values()), **found}


def check_released(device: str, quick: bool) -> dict:
    sys.path.insert(0, HERE)
    import memory_bench

    from higgs_patch.commands import memory

    layers, positions = (1, 128) if quick else (memory.LAYERS, 4096)
    higgs_patch.apply()
    net = memory_bench.model(layers, device=device)
    inputs = on(device, memory_bench.batch(positions))
    supervised = int((torch.nn.functional.pad(inputs["label_ids"], (0, 1), value=-100)[:, 1:] != -100).sum())
    cuda = device.startswith("cuda")
    found = {}
    for name, flags in memory_bench.VARIANTS.items():
        if flags["checkpointing"]:
            net.gradient_checkpointing_enable()
        else:
            net.gradient_checkpointing_disable()
        with higgs_patch.applied(*(["sparse-text-logits"] if flags["sparse"] else [])):
            seconds, growth, loss = measured(device, lambda: memory_bench.step(net, inputs))
        predicted = memory.activation_peak(memory.measured_figures(), layers, positions, supervised, **flags) / 2**20
        found[name] = {"time_ms": seconds * 1e3, "peak_growth_mib": growth, "predicted_growth_mib": predicted,
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": loss}
    plain, both, checkpointing = found["plain"], found["both"], found["checkpointing"]
    return {
        "ok": (not cuda or both["peak_growth_mib"] <= 0.25 * plain["peak_growth_mib"])
        and checkpointing["time_ms"] <= 1.4 * plain["time_ms"]
        and all(abs(v["loss"] - plain["loss"]) <= 2e-2 * abs(plain["loss"]) for v in found.values()),
        "layers": layers, "positions": positions, "supervised_text": supervised, "dtype": "bfloat16",
        "lora_rank": memory_bench.LORA_RANK, "variants": found,
        "model_predicted_total_gib": {e.variant: e.total / 2**30 for e in memory.estimate(positions, lora=16)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, to check the script on any device")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "gpu.json"))
    arguments = parser.parse_args()
    report = {"device": arguments.device, "torch": torch.__version__,
              "card": torch.cuda.get_device_name(0) if arguments.device.startswith("cuda") else "cpu"}
    checks = {
        "collate": lambda: check_collate(arguments.device),
        "bf16": lambda: check_bf16(arguments.device, arguments.quick),
        "spawn": lambda: check_spawn(arguments.device),
        "loss": lambda: check_loss(arguments.device, arguments.quick),
        "sparse": lambda: check_sparse(arguments.device, arguments.quick),
        "released": lambda: check_released(arguments.device, arguments.quick),
    }
    for name, check in checks.items():
        try:
            report[name] = check()
        except Exception as exc:  # every check reports; a failing one does not hide the others
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            higgs_patch.revert()
        print(f"{name}: {'ok' if report[name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(arguments.json), exist_ok=True)
    with open(arguments.json, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(report[name]["ok"] for name in checks) else 1)


if __name__ == "__main__":
    main()
