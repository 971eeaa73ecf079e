"""Adapters that let other frameworks use the model directly; each needs its own optional extra and is imported
only by name (e.g. `from allmpnet.integrations.langchain import AllMpnetEmbeddings`)."""
