"""Deploying the app to a Hugging Face Space (`metaattn-viz deploy`; docs/deploy.md).

manifest.py reads and checks the Space manifest (`Spacefile`); plan.py works out what a
deploy uploads and configures; hub.py makes the Hub calls; cli.py is the subcommand
(`add_deploy_parser`, `run_deploy`).

Imports nothing here, so that registering the subcommand keeps `metaattn-viz --help`
fast (huggingface_hub is imported only when `deploy` runs). Never imported by the app,
the routing core or the store: deploying is an operator's task, and nothing here runs on
the Space itself.
"""
