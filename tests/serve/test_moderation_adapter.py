"""`--moderation-adapter`: /v1/moderations scored by an agile classifier (`safety train-agile`'s output), applied to
its own copy of the base model so the served model is left as it was. A tiny model, since only the wiring is
under test: the scores must equal the classifier's own, loaded in process."""

from __future__ import annotations

import httpx
import pytest

from gemmakit.serve import ServeOptions


@pytest.fixture(scope="module")
def adapter_dir(tiny_chat_gemma, tmp_path_factory):
    import gemmakit
    from gemmakit.safety.agile import AgileConfig, train_agile
    from gemmakit.safety.datasets import Example

    base = gemmakit.load(tiny_chat_gemma.source, dtype="float32")  # a copy: training wraps the module with LoRA layers
    examples = [Example("the quick brown fox", 0), Example("the lazy dog is bad", 1), Example("hello there", 0),
                Example("I will hurt the dog", 1)]
    config = AgileConfig(labels=("is", "dog"), epochs=1, batch_size=2, max_length=110, name="toxic")
    return train_agile(base, examples, config).save(tmp_path_factory.mktemp("agile") / "adapter")


def test_moderations_scored_by_an_agile_classifier(tiny_chat_gemma, adapter_dir, start_server):
    import gemmakit
    from gemmakit.safety.agile import AgileClassifier

    before = tiny_chat_gemma.generate_ids([[2, 300, 301]], max_new_tokens=6)
    options = ServeOptions(model_name="tiny", moderation_adapter=str(adapter_dir), slots=1)
    with start_server(tiny_chat_gemma, options) as server:
        texts = ["the dog is bad", "hello fox"]
        r = httpx.post(server.url + "/v1/moderations", json={"input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "toxic"
        reference = AgileClassifier.load(gemmakit.load(tiny_chat_gemma.source, dtype="float32"), adapter_dir)
        for text, result in zip(texts, body["results"], strict=True):
            expected = reference.score(text)["toxic"]
            assert result["category_scores"] == {"toxic": pytest.approx(expected, abs=1e-6)}
            assert result["flagged"] == (expected >= reference.threshold)
        refused = httpx.post(server.url + "/v1/moderations", json={"input": "x", "policies": ["hate"]})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_parameter"
    assert tiny_chat_gemma.generate_ids([[2, 300, 301]], max_new_tokens=6) == before  # served model untouched
