"""About: the selected model, its adapter manifest, the registry and library versions."""

from __future__ import annotations

import sys

import pandas as pd
import streamlit as st

from app import cache, state

ss = st.session_state


def attention_origin(model) -> str:
    """One sentence: whether the model was trained with entmax or has entmax swapped in, and its alpha."""
    alpha = state.alpha_label(model.alpha)
    if model.native:
        return (f"**Trained with entmax:** its own `config.json` declares α = `{alpha}` (`entmax_alpha`), "
                "so it runs as it was trained, without an adapter.")
    where = {"catalogue": "the catalogue entry", "argument": "the caller", "default": "the default"}.get(
        model.alpha_source, model.alpha_source)
    return f"**Softmax model with entmax swapped in:** α = `{alpha}`, from {where}."


def main() -> None:
    name = ss[state.MODEL]
    specs = state.registry()
    spec = specs[name]

    st.title("About")
    st.markdown(
        "**sparsefinder** studies sparse attention: each head of an encoder runs "
        "α-entmax instead of softmax, so many attention probabilities are exactly zero. "
        "The *gold graph* of a head is the set of (query, key) pairs with p > 0, and its "
        "*sparsity* is 1 − edges / n² over the n real tokens of a sentence."
    )

    st.header("Model")
    st.table(
        pd.DataFrame(
            {
                "value": [
                    name,
                    spec.description or "—",
                    state.alpha_label(spec.alpha),
                    spec.path,
                    spec.adapter or "none",
                    spec.task,
                ]
            },
            index=pd.Index(["name", "description", "alpha", "weights", "adapter", "task"], name="field"),
        )
    )

    with st.spinner(f"Loading model {name}…", show_time=True):
        outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(f"Could not load model **{name}**: {outcome.error}")
    else:
        model = outcome.model
        st.markdown(
            f"Loaded on `{model.device}`: {model.num_layers} layers × {model.num_heads} heads, "
            f"at most {model.max_length} tokens per text, {'causal' if model.causal else 'bidirectional'} attention."
        )
        st.markdown(attention_origin(model))
        st.subheader("Adapter manifest")
        if model.adapter_manifest:
            st.json(model.adapter_manifest)
        else:
            st.info("No adapter: the packaged base weights run with entmax attention as they are.")

    st.header("Registered models")
    st.table(
        pd.DataFrame(
            [
                {
                    "model": n,
                    "default": "yes" if n == state.default_model() else "",
                    "alpha": state.alpha_label(s.alpha),
                    "adapter": s.adapter or "none",
                    "catalogue": s.source,
                    "description": s.description,
                }
                for n, s in specs.items()
            ]
        ).set_index("model")
    )

    st.header("Library versions")
    versions = {**state.versions(), "python": sys.version.split()[0]}
    with st.container(key="versions"):
        st.table(pd.DataFrame({"version": list(versions.values())}, index=pd.Index(list(versions), name="package")))


main()
