"""The GPU memory plan (medkit.memplan), on the CPU: real architectures on the meta device, every
GPU step checked against its profile's budget."""
import copy

import pytest

from medkit import config, memplan

GPU_PROFILES = [p for p in config.PROFILES if config.PROFILES[p].get("gpu_budget_gib")]


@pytest.mark.parametrize("name", sorted(memplan.ARCHITECTURES))
def test_meta_models_have_the_parameter_counts_of_their_model_cards(name):
    s = memplan.shapes(name)
    card = memplan.ARCHITECTURES[name]["card_params"]
    assert abs(s.params - card) / card < 0.011, f"{name}: built {s.params:,} parameters, the card says {card:,}"


def test_the_profiles_name_models_the_plan_knows():
    assert set(GPU_PROFILES) >= {"colab-t4", "gpu-24gb"}
    for p in GPU_PROFILES:
        st = config.PROFILES[p]["stages"]
        for ref in (st["sft"]["base_model"], st["qlora"]["base_model"], st["cot"]["base_model"], st["t5"]["base_model"],
                    st["rag"]["embedder"], st["rag"]["reranker"], st["eval"]["bertscore_model"]):
            memplan.canonical(ref)  # raises naming the model when its configuration is missing


def test_lora_and_nf4_arithmetic():
    r1 = memplan.shapes("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    # r=16 on all seven projections of 32 Llama-3.1-8B layers: 16·(in+out) summed = 41,943,040
    assert r1.lora_params(config.PROFILES["colab-t4"]["stages"]["cot"]["lora"]["target_modules"], 16) == 41_943_040
    q4 = memplan.weights_bytes(r1, "float16", quant4=True)
    assert 0.3 < q4 / memplan.weights_bytes(r1, "float16") < 0.4  # 8B: 15 GiB in 16-bit, about 5.3 in NF4
    assert memplan.NF4_BYTES / 2 < 0.27  # quantised layers: about a quarter of their 16-bit size


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_every_gpu_step_fits_its_profile_budget(profile):
    steps = memplan.plan(profile)
    assert {s.notebook for s in steps} >= {"02_sft", "03_dpo", "04_qlora_phi2", "05_r1_cot_unsloth", "06_rag",
                                             "08_benchmarking", "09_vllm_serving"}
    too_big = [s.explain() for s in steps if not s.fits]
    assert not too_big, "\n".join(too_big)


def test_a_step_that_does_not_fit_is_named_with_its_numbers(monkeypatch):
    """The gpu-24gb SFT settings before the plan: batch 16 × 1024 tokens without checkpointing."""
    profiles = copy.deepcopy(config.PROFILES)
    profiles["gpu-24gb"]["stages"]["sft"].update(batch_size=16, gradient_checkpointing=False)
    monkeypatch.setattr(config, "PROFILES", profiles)
    bad = [s for s in memplan.plan("gpu-24gb") if not s.fits]
    assert [s.step for s in bad] == ["sft: LoRA training"]
    text = bad[0].explain()
    assert "DOES NOT FIT" in text and "of 24 GiB" in text and "logits" in text and "02_sft" in text
    assert bad[0].total_gib > 24


def test_05_reloads_the_merged_8b_in_4bit_where_16bit_does_not_fit():
    """Defect 3: the merged 8B in 16-bit is 15 GiB. Beside the 4-bit training model it fits
    neither card; alone it fits 24 GB but not a T4, where it is reloaded in 4-bit."""
    r1 = memplan.shapes("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    base = config.PROFILES["colab-t4"]["stages"]["cot"]["base_model"]
    still_loaded = memplan.weights_bytes(r1, "float16", quant4=True)
    assert memplan.reload_precision("colab-t4", base, resident_bytes=still_loaded) == "4-bit"
    assert memplan.reload_precision("colab-t4", base) == "4-bit"
    assert memplan.reload_precision("gpu-24gb", base) == "16-bit"
    assert memplan.reload_precision("gpu-24gb", base, resident_bytes=still_loaded + 4 * memplan.GIB) == "4-bit"


def test_plan_table_lists_every_step():
    steps = memplan.plan("colab-t4")
    text = memplan.table(steps)
    assert text.count("\n") == len(steps) + 1 and "| colab-t4 | 05_r1_cot_unsloth |" in text
