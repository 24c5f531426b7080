"""`EvoTokVLMConfig.image_position_embeddings`: a learned 2-D (row + column) position embedding added to every image
token's LLM input, read or generated, so that an LLM can tell where an image token sits."""

import pytest
import torch
from vlm_helpers import T2I_PROMPTS, generate_codes, tiny_generation_vlm, tiny_processor

from evotok_hf import EvoTokForConditionalGeneration


@pytest.fixture(scope="module")
def processor(t2i_tokenizer):
    return tiny_processor(t2i_tokenizer, wrap_image_tokens=False)


def joint_model(tokenizer, positions: bool, seed: int = 0):
    return tiny_generation_vlm(tokenizer, seed=seed, has_understanding_head=True, wrap_image_tokens=False,
                               image_position_embeddings=positions)  # fmt: skip


def randomise_positions(model, scale: float = 1.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in (model.image_position_embedding.row, model.image_position_embedding.column):
            table.copy_(torch.randn(table.shape, generator=g) * scale)


def test_off_by_default_and_leaves_the_checkpoint_layout_alone(t2i_tokenizer):
    model = joint_model(t2i_tokenizer, positions=False)
    assert model.config.image_position_embeddings is False
    assert not any("image_position" in key for key in model.state_dict())
    with_positions = joint_model(t2i_tokenizer, positions=True)
    extra = set(with_positions.state_dict()) - set(model.state_dict())
    assert extra == {"model.image_position_embedding.row", "model.image_position_embedding.column"}
    grid, hidden = model.config.vision_config.grid_size, model.config.text_config.hidden_size
    assert with_positions.image_position_embedding.row.shape == (grid, hidden)


def test_zero_at_initialisation_so_outputs_do_not_change(t2i_tokenizer, processor):
    """A model that gains the embeddings computes exactly what it computed without them until they are trained."""
    plain = joint_model(t2i_tokenizer, positions=False)
    gained = joint_model(t2i_tokenizer, positions=True)
    assert gained.image_position_embedding.row.abs().sum() == 0 and gained.image_position_embedding.column.abs().sum() == 0
    missing, unexpected = gained.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"model.image_position_embedding.row", "model.image_position_embedding.column"}
    assert not unexpected
    torch.testing.assert_close(generate_codes(gained, processor, do_sample=False, guidance_scale=2.0),
                               generate_codes(plain, processor, do_sample=False, guidance_scale=2.0), rtol=0, atol=0)  # fmt: skip
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(gained.get_image_features(pixel_values=pixels), plain.get_image_features(pixel_values=pixels))


def test_each_image_token_gets_its_row_plus_its_column(t2i_tokenizer):
    plain = joint_model(t2i_tokenizer, positions=False)
    model = joint_model(t2i_tokenizer, positions=True)
    model.load_state_dict(plain.state_dict(), strict=False)
    randomise_positions(model)
    vision = model.config.vision_config
    grid = vision.grid_size
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, vision.image_size, vision.image_size, generator=g) * 2 - 1
    codes = torch.randint(0, vision.codebook_size, (2, grid * grid, vision.pixel_depth), generator=g)
    with torch.no_grad():
        read = model.get_image_features(pixel_values=pixels) - plain.get_image_features(pixel_values=pixels)
        written = model.model.get_generation_embeddings(codes) - plain.model.get_generation_embeddings(codes)
        one_position = model.model.get_generation_embeddings(codes[:, 11], positions=11)
    row, column = model.image_position_embedding.row.detach(), model.image_position_embedding.column.detach()
    for index in range(grid * grid):
        expected = row[index // grid] + column[index % grid]
        for difference in (read, written):
            torch.testing.assert_close(difference[:, index], expected.expand(2, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_position, model.model.get_generation_embeddings(codes)[:, 11])
    with pytest.raises(ValueError, match="not whole images"):
        model.model.get_generation_embeddings(codes[:, :5])


def test_generation_adds_the_position_it_was_trained_with(t2i_tokenizer, processor):
    """Greedy image generation, step by step with the cache, must take the codes that the teacher-forced forward of the
    training loss ranks first at every position and depth: the position embedding of each generated token is the one
    the loss saw there. Tables large enough to change the codes make a wrong position show."""
    model = joint_model(t2i_tokenizer, positions=True)
    randomise_positions(model, scale=3.0)
    codes = generate_codes(model, processor, prompts=T2I_PROMPTS[:1], do_sample=False, guidance_scale=1.0)
    plain = joint_model(t2i_tokenizer, positions=False)
    assert not torch.equal(codes, generate_codes(plain, processor, prompts=T2I_PROMPTS[:1], do_sample=False,
                                                 guidance_scale=1.0))  # fmt: skip
    vision = model.config.vision_config
    prompt = processor(text=T2I_PROMPTS[:1], generation_mode="image", return_tensors="pt")
    image = torch.full((1, vision.grid_size**2), model.config.image_token_id)
    input_ids = torch.cat([prompt["input_ids"], image], dim=1)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, generation_codes=codes).last_hidden_state
        start = prompt["input_ids"].shape[1] - 1  # the image start token predicts position 0
        conditions = hidden[0, start : start + vision.grid_size**2]
        targets = codes.flatten(0, 2)
        sums = model.vision_tower.quantizer.embed_codes(targets[:, :-1], return_cumulative=True)
        logits = model.depth_head(hidden_states=conditions, code_embedding_sums=sums).logits
    assert torch.equal(logits.argmax(-1), targets)


def test_from_components_and_training_stages_treat_it_as_a_new_part(tmp_path, t2i_tokenizer):
    from evotok_hf import EvoTokModel
    from evotok_hf.training.vlm import new_module_names, prepare_model_for_stage
    from transformers import Qwen2Config, Qwen2ForCausalLM

    source = joint_model(t2i_tokenizer, positions=False)
    source.vision_tower.save_pretrained(tmp_path / "tokenizer")
    llm = Qwen2ForCausalLM(Qwen2Config(**{**source.config.text_config.to_dict(), "architectures": None}))
    model, _ = EvoTokForConditionalGeneration.from_components(
        EvoTokModel.from_pretrained(tmp_path / "tokenizer"), llm, text_tokenizer=t2i_tokenizer,
        has_generation_head=True, image_position_embeddings=True,
        depth_head_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
    )  # fmt: skip
    assert model.config.image_position_embeddings
    assert model.image_position_embedding.row.abs().sum() == 0
    assert "image_position_embedding" in new_module_names(model)
    prepare_model_for_stage(model, "pretrain")
    assert model.image_position_embedding.row.requires_grad and not model.language_model.embed_tokens.weight.requires_grad
    model.save_pretrained(tmp_path / "vlm")
    reloaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert reloaded.config.image_position_embeddings
    assert torch.equal(reloaded.image_position_embedding.column, model.image_position_embedding.column)
