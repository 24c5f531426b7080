"""The EvoTok Shapes VQA task's functions (lmms-eval loads this file by path, beside the task's YAML)."""

from evotok_hf.evaluation.shapes_scoring import exact_match


def one_row_per_question(scenes):
    """Shapes scenes, each with its list of questions -> one row per question: image, question, answer, type. Kept in
    memory, so nothing is written into the dataset's folder."""

    def explode(batch: dict) -> dict:
        rows = {"image": [], "question": [], "answer": [], "question_type": []}
        for image, questions in zip(batch["image"], batch["questions"]):
            for qa in questions:
                rows["image"].append(image)
                for key in ("question", "answer", "question_type"):
                    rows[key].append(qa[key])
        return rows

    return scenes.map(explode, batched=True, remove_columns=scenes.column_names, keep_in_memory=True)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
