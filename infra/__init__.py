"""Infrastructure as code: the merge template and the boto3 deploy (see infra/deploy.py)."""
