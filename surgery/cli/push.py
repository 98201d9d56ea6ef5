"""`surgery push`: verify a checkpoint, then upload it to the Hub with its card."""

from pathlib import Path

import click

from surgery.cli.errors import friendly_errors
from surgery.cli.options import NO_VERIFY, TRUST_REMOTE_CODE


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to push to (created if needed).")
@click.option("--commit-message", default=None)
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the login cache).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, with sizes, and upload nothing.")
@NO_VERIFY
@TRUST_REMOTE_CODE
@friendly_errors
def push(folder, repo_id, private, revision, commit_message, token, dry_run, no_verify, trust_remote_code):
    """Verify FOLDER and upload it to the Hub as REPO_ID, with its model card."""
    from surgery.checkpoint.hub import push as push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, verify=not no_verify, trust_remote_code=trust_remote_code)
    if dry_run:
        for name, size in result.files:
            click.echo(f"{size:>14,}  {name}")
        click.echo(f"{sum(size for _, size in result.files):>14,}  bytes in {len(result.files)} files (dry run: nothing uploaded)")
    else:
        click.echo(f"pushed {folder} to {result.url}")
