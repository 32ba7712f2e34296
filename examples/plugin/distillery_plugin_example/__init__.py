"""An example distillery plugin. It imports nothing: distillery imports
``distillery_plugin_example.standardize`` when a pipeline first asks for its kind."""
