"""The packed-batch format shared by data, model and inference: joint vocabulary, delay,
sequence template, stored records, audio layout and the batch contract. Imports nothing above
`ualm_jax.config`."""
