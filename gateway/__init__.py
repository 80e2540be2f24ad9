"""vlmq-gateway: HTTP in front of vlmq (OpenAI chat completions, a job API, keys, quotas).

Stateless: every piece of state lives in Redis, so any number of gateway processes can serve
behind a load balancer. Built only on the ``producer`` package (never on ``worker``).
"""
