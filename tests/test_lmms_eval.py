"""`lmms-eval --model evotok` (evotok_hf.integrations.lmms_eval) on a tiny VLM and a local task: EvoTok Shapes
questions (one or two scenes per prompt) saved with `save_to_disk`, task YAML under a temporary `--include_path`. The
answers lmms-eval records (through `simple_evaluate`, the CLI, two torchrun processes) are checked against the same
model's answers computed directly (the processor's chat template + `generate`, one prompt at a time), multiple-choice
scores against a direct forward pass, and the shipped Shapes VQA task against the scenes `make demo` writes."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2Config

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: pip install -e '.[lmms-eval]', then `pip uninstall -y torchvision timm` beside "
    "a CPU torch (`make test` does both)",
)

from vlm_helpers import bpe_tokenizer, tiny_processor, tiny_vlm_config  # noqa: E402

import evotok_hf.integrations.lmms_eval  # noqa: E402
from evotok_hf import EvoTokForConditionalGeneration  # noqa: E402
from evotok_hf.integrations.lmms_eval.model import EvoTokChat, EvoTokSimple, generation_settings  # noqa: E402
from evotok_hf.miniature.shapes import load_shapes_dataset  # noqa: E402

MAX_NEW_TOKENS = 8
SHIPPED_TASKS = pathlib.Path(evotok_hf.integrations.lmms_eval.__file__).parent / "tasks"
NUM_DOCS = 6
# doc_to_visual (simple mode, multiple choice) and doc_to_messages (chat mode): the doc's scenes, then its question.
TASK_UTILS = '''
def doc_to_visual(doc):
    return list(doc["images"])


def doc_to_messages(doc):
    content = [{"type": "image", "url": image} for image in doc["images"]]
    content.append({"type": "text", "text": doc["question"]})
    return [{"role": "user", "content": content}]
'''


# ----------------------------------------------------------------------------- the model, the task, direct answers
@pytest.fixture(scope="module")
def shapes_docs():
    """Six questions about EvoTok Shapes scenes; every other one shows a second scene as well."""
    scenes = load_shapes_dataset(num_train=0, num_validation=0, num_test=NUM_DOCS + 1)["test"]
    docs = []
    for index in range(NUM_DOCS):
        scene = scenes[index]
        question = scene["questions"][index % len(scene["questions"])]
        images = [scene["image"]] + ([scenes[index + 1]["image"]] if index % 2 else [])
        docs.append({"images": images, "question": question["question"], "answer": question["answer"],
                     "choices": ["yes", "no", "red", "triangle"]})  # fmt: skip
    return docs


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory, shapes_docs):
    """A tiny VLM and its processor saved as a folder, as `pretrained=` takes it. A wide initialisation gives varied
    greedy answers; the image special tokens are suppressed, as `from_components` does."""
    corpus = [doc["question"] + " " + doc["answer"] for doc in shapes_docs] + ["assistant user system"]
    tokenizer = bpe_tokenizer(corpus)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EvoTokForConditionalGeneration(tiny_vlm_config(tokenizer, text_config=text.to_dict())).eval()
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(["<image>", "<boi>", "<eoi>"])
    folder = tmp_path_factory.mktemp("evotok_vlm")
    model.save_pretrained(folder)
    tiny_processor(tokenizer).save_pretrained(folder)
    return str(folder)


def write_task(folder: pathlib.Path, name: str, output_type: str, extra: str) -> None:
    folder.joinpath(f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {folder / 'data'}\ndataset_kwargs:\n  load_from_disk: true\ntest_split: test\n"
        f"output_type: {output_type}\ndoc_to_visual: !function utils.doc_to_visual\ndoc_to_text: question\n"
        + textwrap.dedent(extra)
    )


@pytest.fixture(scope="module")
def include_path(tmp_path_factory, shapes_docs):
    """A task folder: the docs (save_to_disk), the YAML of a question-answering task and of a multiple-choice one."""
    import datasets

    folder = tmp_path_factory.mktemp("tasks")
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "choices": datasets.Sequence(datasets.Value("string")),
    })  # fmt: skip
    columns = {key: [doc[key] for doc in shapes_docs] for key in features}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(folder / "data")
    folder.joinpath("utils.py").write_text(TASK_UTILS)
    write_task(folder, "evotok_shapes_qa", "generate_until", qa_task_tail())
    write_task(folder, "evotok_shapes_mc", "multiple_choice", """\
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
        """)  # fmt: skip
    return folder


def qa_task_tail(until: str | None = None) -> str:
    stop = f"  until: [{json.dumps(until)}]\n" if until is not None else ""
    return textwrap.dedent(f"""\
        doc_to_messages: !function utils.doc_to_messages
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          do_sample: false
        """) + stop + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"


def messages(doc: dict) -> list[dict]:
    content = [{"type": "image", "image": image} for image in doc["images"]]
    return [{"role": "user", "content": content + [{"type": "text", "text": doc["question"]}]}]


@pytest.fixture(scope="module")
def direct(vlm_folder):
    model = AutoModelForImageTextToText.from_pretrained(vlm_folder).eval()
    return model, AutoProcessor.from_pretrained(vlm_folder)


def direct_answer(direct, doc: dict, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The model's greedy answer to one doc alone: {"text", "tokens": its token ids, "prompt_tokens": how many}."""
    model, processor = direct
    inputs = processor.apply_chat_template(messages(doc), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    return {"text": processor.decode(new, skip_special_tokens=True), "tokens": new.tolist(),
            "prompt_tokens": inputs["input_ids"].shape[1]}  # fmt: skip


@pytest.fixture(scope="module")
def direct_answers(direct, shapes_docs):
    answers = [direct_answer(direct, doc) for doc in shapes_docs]
    # the comparisons below mean something only if the answers differ and are not all empty
    assert len({answer["text"] for answer in answers}) > 2
    return answers


def evaluate(vlm_folder, include_path, task, batch_size=1, force_simple=False):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model="evotok", model_args=f"pretrained={vlm_folder},batch_size={batch_size}", tasks=[task],
        task_manager=TaskManager(include_path=str(include_path), model_name="evotok"), log_samples=True,
        force_simple=force_simple, bootstrap_iters=0,
    )  # fmt: skip


def recorded(results, task) -> list[tuple[str, dict]]:
    """(answer, token counts) per doc, from lmms-eval's logged samples."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [(sample["resps"][0][0], sample["token_counts"][0]) for sample in samples]


# ----------------------------------------------------------------------------- registration and arguments
def test_evotok_is_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("evotok") is EvoTokChat
    assert get_model("evotok", force_simple=True) is EvoTokSimple


def test_generation_kwargs_map_onto_generate():
    greedy, stops = generation_settings({"until": ["\n\n", ""], "max_new_tokens": 16, "temperature": 0,
                                         "do_sample": True, "top_p": 0.9, "num_beams": 3})  # fmt: skip
    assert greedy == {"max_new_tokens": 16, "num_beams": 3, "do_sample": False} and stops == ("\n\n",)
    sampled, stops = generation_settings({"until": "ASSISTANT:", "temperature": 0.7, "top_p": 0.9})
    assert sampled == {"max_new_tokens": 128, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert stops == ("ASSISTANT:",)
    assert generation_settings({"do_sample": True})[0]["temperature"] == 1.0
    assert generation_settings({})[0]["do_sample"] is False


def test_model_args_win_over_the_cli_and_load_in_the_asked_dtype(vlm_folder, monkeypatch):
    model = EvoTokChat.create_from_arg_string(f"pretrained={vlm_folder},dtype=bfloat16,batch_size=4",
                                              {"batch_size": 1, "max_batch_size": None, "device": None})  # fmt: skip
    assert model.batch_size == 4 and model.device == torch.device("cpu")
    assert model.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.vision_tower.quantizer.codebook.dtype == torch.float32
    loads = []
    load = AutoModelForImageTextToText.from_pretrained
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained",
                        lambda *args, **kwargs: loads.append(kwargs) or load(*args, **kwargs))  # fmt: skip
    mapped = EvoTokChat.create_from_arg_string(f"pretrained={vlm_folder},device_map=auto", {"batch_size": 2})
    assert mapped.batch_size == 2 and loads[0]["device_map"] == "auto" and mapped.device == torch.device("cpu")
    with pytest.raises(ValueError, match="batch_size"):
        EvoTokChat(pretrained=vlm_folder, batch_size="auto")
    with pytest.raises(ValueError, match="dtype"):
        EvoTokChat(pretrained=vlm_folder, dtype="bf16")


# ----------------------------------------------------------------------------- generation through simple_evaluate
@pytest.mark.parametrize("batch_size, force_simple", [(1, False), (4, False), (4, True)])
def test_simple_evaluate_records_the_models_answers(vlm_folder, include_path, shapes_docs, direct_answers, batch_size,
                                                   force_simple):  # fmt: skip
    """Batches of 4 (mixing prompts with one and two images, left-padded) and the simple mode give each prompt's
    answer alone; the token counts are those of the direct run."""
    results = evaluate(vlm_folder, include_path, "evotok_shapes_qa", batch_size, force_simple)
    answers = recorded(results, "evotok_shapes_qa")
    assert [answer for answer, _ in answers] == [answer["text"] for answer in direct_answers]
    assert [counts for _, counts in answers] == [
        {"input_tokens": answer["prompt_tokens"], "output_tokens": len(answer["tokens"])} for answer in direct_answers
    ]
    exact = sum(answer.strip() == doc["answer"] for (answer, _), doc in zip(answers, shapes_docs))
    assert results["results"]["evotok_shapes_qa"]["exact_match,none"] == pytest.approx(exact / NUM_DOCS)


def test_until_stops_generation_and_cuts_the_answer(vlm_folder, include_path, direct_answers, tmp_path):
    """A stop string from inside an answer: generation stops at the token that completes it (counted by decoding the
    direct answer's growing prefixes) and the answer ends before it. The random model writes partial UTF-8 too, so the
    stop string is two ASCII letters that the direct answer holds before its last token."""
    decode = AutoProcessor.from_pretrained(vlm_folder).tokenizer.decode
    prefixes = [[decode(a["tokens"][:k]) for k in range(1, len(a["tokens"]) + 1)] for a in direct_answers]
    stop = next(
        prefix[-2][i : i + 2] for prefix in prefixes if len(prefix) > 1 for i in range(len(prefix[-2]) - 1)
        if prefix[-2][i : i + 2].isascii() and prefix[-2][i : i + 2].isalpha()
    )  # fmt: skip
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / "data").symlink_to(include_path / "data")
    write_task(folder, "evotok_shapes_until", "generate_until", qa_task_tail(until=stop))
    for batch_size in (1, 4):
        answers = recorded(evaluate(vlm_folder, folder, "evotok_shapes_until", batch_size), "evotok_shapes_until")
        for (got, counts), expected, prefix in zip(answers, direct_answers, prefixes):
            assert got == expected["text"].split(stop, 1)[0]
            stopped_at = next((k for k, text in enumerate(prefix, start=1) if stop in text), len(prefix))
            assert counts["output_tokens"] == stopped_at
        assert sum(counts["output_tokens"] for _, counts in answers) < sum(len(a["tokens"]) for a in direct_answers)


# ----------------------------------------------------------------------------- multiple choice
def direct_loss(direct, doc, continuation) -> tuple[float, bool]:
    model, processor = direct
    inputs = processor.apply_chat_template(messages(doc), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    target = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = torch.cat([inputs["input_ids"], target], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"]).logits[0]
    start = inputs["input_ids"].shape[1]
    logprobs = logits[start - 1 : start - 1 + target.shape[1]].log_softmax(-1)
    loss = -logprobs.gather(-1, target[0][:, None]).mean()
    return float(loss), bool((logprobs.argmax(-1) == target[0]).all())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_multiple_choice_scores_are_the_continuations_mean_loss(vlm_folder, include_path, direct, shapes_docs,
                                                                batch_size):  # fmt: skip
    results = evaluate(vlm_folder, include_path, "evotok_shapes_mc", batch_size, force_simple=True)
    samples = sorted(results["samples"]["evotok_shapes_mc"], key=lambda sample: sample["doc_id"])
    correct = 0
    for sample, doc in zip(samples, shapes_docs):
        scores = [response[0] for response in sample["resps"]]
        expected = [direct_loss(direct, doc, " " + choice) for choice in doc["choices"]]
        for (loss, greedy), (expected_loss, expected_greedy) in zip(scores, expected):
            assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-5) and greedy == expected_greedy
        losses = [loss for loss, _ in expected]
        correct += doc["choices"][losses.index(min(losses))] == doc["answer"]
    assert results["results"]["evotok_shapes_mc"]["acc,none"] == pytest.approx(correct / NUM_DOCS)


# ----------------------------------------------------------------------------- the shipped Shapes VQA task
def test_the_shipped_shapes_vqa_task_asks_every_question_of_the_demo_scenes(vlm_folder, direct, tmp_path, monkeypatch):
    """The task the README runs on the miniature VLM, reading the scenes where `make demo` saves them: one request per
    question, answered as the model answers it alone (4 new tokens), scored by the demo's exact match."""
    import datasets

    from evotok_hf.evaluation.shapes_scoring import exact_match

    scenes = datasets.DatasetDict({"test": load_shapes_dataset(num_train=0, num_validation=0, num_test=2)["test"]})
    scenes.save_to_disk(tmp_path / "outputs" / "demo" / "data" / "shapes_dataset")
    monkeypatch.chdir(tmp_path)
    results = evaluate(vlm_folder, SHIPPED_TASKS, "evotok_shapes_vqa", batch_size=4)
    questions = [(scene["image"], qa) for scene in scenes["test"] for qa in scene["questions"]]
    expected = [direct_answer(direct, {"images": [image], "question": qa["question"]}, 4)["text"]
                for image, qa in questions]  # fmt: skip
    assert [answer for answer, _ in recorded(results, "evotok_shapes_vqa")] == expected
    hits = [exact_match(answer, qa["answer"]) for answer, (_, qa) in zip(expected, questions)]
    assert results["results"]["evotok_shapes_vqa"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


# ----------------------------------------------------------------------------- the CLI
def run_cli(launcher: list[str], vlm_folder, include_path, output_path) -> tuple[subprocess.CompletedProcess, list]:
    """lmms-eval on the question-answering task, through `launcher`; returns the run and the logged samples in doc
    order. The CLI exits 0 even when the run fails, so the results file is what shows that it finished (as the README
    says)."""
    command = launcher + ["--model", "evotok", "--model_args", f"pretrained={vlm_folder},batch_size=2",
                          "--tasks", "evotok_shapes_qa", "--include_path", str(include_path), "--output_path",
                          str(output_path), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results_files = list(output_path.rglob("*_results.json"))
    samples_files = list(output_path.rglob("*_samples_evotok_shapes_qa.jsonl"))
    assert len(results_files) == 1 and len(samples_files) == 1, (run.stdout[-3000:], run.stderr[-3000:])
    results = json.loads(results_files[0].read_text())
    assert "exact_match,none" in results["results"]["evotok_shapes_qa"]
    samples = [json.loads(line) for line in samples_files[0].read_text().splitlines()]
    return run, sorted(samples, key=lambda sample: sample["doc_id"])


@pytest.mark.integration
def test_cli_writes_results_and_samples_with_the_models_answers(vlm_folder, include_path, direct_answers, tmp_path):
    """The documented command, as a user runs it."""
    cli = str(pathlib.Path(sys.executable).with_name("lmms-eval"))
    _, samples = run_cli([cli, "eval"], vlm_folder, include_path, tmp_path / "out")
    assert [sample["filtered_resps"] for sample in samples] == [answer["text"] for answer in direct_answers]
    assert [sample["token_counts"] for sample in samples] == [
        [{"input_tokens": answer["prompt_tokens"], "output_tokens": len(answer["tokens"])}] for answer in direct_answers
    ]


@pytest.mark.integration
def test_two_processes_split_the_requests_and_give_the_same_answers(vlm_folder, include_path, direct_answers,
                                                                    tmp_path):  # fmt: skip
    """Data parallel as on several GPUs (one model per process, on `cuda:<LOCAL_RANK>` there), here on CPU through
    torchrun: rank 0 answers half the docs and the gathered samples hold every doc's answer."""
    torchrun = str(pathlib.Path(sys.executable).with_name("torchrun"))
    run, samples = run_cli([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval"], vlm_folder,
                           include_path, tmp_path / "out")  # fmt: skip
    assert [sample["filtered_resps"] for sample in samples] == [answer["text"] for answer in direct_answers]
    assert f"EvoTok answering: 100%|██████████| {NUM_DOCS // 2}/{NUM_DOCS // 2}" in run.stderr
