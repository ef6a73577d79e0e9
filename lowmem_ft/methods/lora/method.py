"""LoRA (Hu et al., 2021) through peft: an adapter on each --targets linear layer; on an NF4 base
with --base-quant nf4 (QLoRA). The structured methods' runtime (structured/method.py) with LoRA's
selection (plan.py); it writes a peft adapter (JOB/adapter), merged on request
(`lowmem-ft export JOB --merge`)."""

from __future__ import annotations

import json

from lowmem_ft.files import readable_as_umask_allows
from lowmem_ft.methods.lora.plan import select_lora
from lowmem_ft.methods.structured.method import StructuredMethod
from lowmem_ft.models.saving import copy_notices
from lowmem_ft.results import ADAPTER_DIR, ADAPTER_META, base_metadata


def _sort_lists(config_file) -> None:
    """peft keeps target_modules (and a few others) as a set, which it writes in an order that
    changes from process to process: sorted, the same training gives the same file."""
    config = json.loads(config_file.read_text())
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class LoRA(StructuredMethod):
    name = "lora"

    def select(self, terms, linears, n_layers, model_type):
        return select_lora(self.config.method_options, terms, linears, n_layers, model_type)

    def export(self, model, tokenizer, job_dir, save_dtype, base):
        out = job_dir / ADAPTER_DIR
        # Where AutoPeftModel finds the base: its hub id, or the local directory it was loaded from.
        self.peft_model.peft_config["default"].base_model_name_or_path = base.hub_id or str(base.weights_dir)
        # adapter_config.json + adapter_model.safetensors (fp32); the embeddings did not train, and
        # peft would otherwise look the base up on the hub to find out.
        self.peft_model.save_pretrained(out, save_embedding_layers=False)
        readable_as_umask_allows(out)
        _sort_lists(out / "adapter_config.json")
        meta = {
            **base_metadata(self.name, base, self.config.method_options, self.config.trust_remote_code),
            "lora_targets": len(self.selection.lora_targets),
            "trainable": self.trainable_count(),
        }
        (out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        copy_notices(base.weights_dir, out)  # an adapter of a Llama is a derivative of it too
        return out


class SPAFIT(StructuredMethod):
    name = "spafit"
