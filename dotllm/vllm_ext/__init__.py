"""The only package that touches vLLM internals: the plugin and the patches it installs."""
