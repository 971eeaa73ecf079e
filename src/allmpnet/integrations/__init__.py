"""Adapters that let other frameworks use the model directly; each needs its own optional extra and is imported
only by name (`from allmpnet.integrations.langchain import AllMpnetEmbeddings`,
`from allmpnet.integrations.llama_index import AllMpnetEmbedding`)."""
