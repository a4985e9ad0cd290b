"""gemmakit.explain: why did the model say this? LIT-style sequence salience and SAE feature attribution.

    from gemmakit import explain
    s = explain.salience(model, "The capital of France is", target=" Paris.", span="0:1",
                         method="grad_dot_input")            # or grad_l2, integrated_gradients
    s.to_dict("word")                                         # {"tokens": [...], "scores": [...], ...}
    f = explain.attribute(model, sae, "The capital of France is", target=" Paris.")   # SAE latents
    f.features, f.error_share

Modules: salience (gradients, integrated gradients, the float copy), segments (words, sentences, lines,
paragraphs, regex), features (SAE attribution, summaries, steering), render (terminal, HTML), web (the live
page's FastAPI router), cli (`gemmakit explain`, `gemmakit explore`). docs/explain.md says what is computed.
"""

from gemmakit.explain.features import FeatureAttribution, attribute, steer_generate
from gemmakit.explain.salience import DEFAULT_STEPS, METHODS, Problem, Salience, make_problem, salience
from gemmakit.explain.segments import GRANULARITIES, Segment, aggregate

__all__ = ["DEFAULT_STEPS", "GRANULARITIES", "METHODS", "FeatureAttribution", "Problem", "Salience", "Segment",
           "aggregate", "attribute", "make_problem", "salience", "steer_generate"]
