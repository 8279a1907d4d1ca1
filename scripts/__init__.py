"""The `deepseekmoe` command: the CLI (`deepseekmoe.cli`, with `convert` and `footprint`) and the built-in demo
(`deepseekmoe.demo`). Library code lives with its concern: loading in `modeling_deepseekmoe.loading` and
`deepseekmoe.finetune.adapters`, generation in `deepseekmoe.eval.inference`, model cards in
`deepseekmoe.model_cards.card`, the synthetic corpus in `deepseekmoe.finetune.synthetic`, memory footprints in
`modeling_deepseekmoe.footprint`."""
