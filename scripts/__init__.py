"""The `deepseekmoe` tools: the command line (`deepseekmoe.cli`) and the built-in demo (`deepseekmoe.demo`)."""
