"""The sub-commands of ``paypoll`` (see worker/cli.py): one module each."""
