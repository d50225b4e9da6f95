"""The OpenAI-compatible HTTP service: the Flask app and its routes (`app`), the service's state and
request handling (`service`, `generation`), each API's handler and models (`api`), metrics, security (API keys,
CORS), the WSGI runner, and `engines`, which builds the engine `--engine` names.

May import: llmctl.engine, llmctl.core, llmctl.keyfile, llmctl.errors, llmctl.envvars. Never the
client, the doctor, the bench or the CLI.
"""
