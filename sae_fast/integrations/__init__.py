"""Drop-in layers for the pipelines researchers already run, each imported on its own (each
needs its library): ``saelens`` (SAELens's architectures on sae_fast's ops, registered on
import), ``sparsify`` (a SparseCoder on sae_fast's ops, and sparsify's Trainer building it),
``transformer_lens`` and ``nnsight`` (a sae_fast SAE spliced into a HookedTransformer or an
nnsight trace)."""
