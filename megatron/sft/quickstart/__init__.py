"""The built-in tiny default: a checkable synthetic task and the end-to-end pipeline that
`make demo` runs (tokenizer -> model -> data -> convert -> tokenize -> train -> export -> eval)."""
