"""Code shared by the iotplat Pulumi programs in stacks/aws and stacks/azure.

Nothing in this package creates resources itself. ``config`` turns the stack config written by
``iotplat render`` into a validated, frozen ``StackConfig``; ``plan`` decides subnets,
addresses, public exposure and firewall rules from it; ``program`` is the wiring both programs
share (the per-host loop and the stack outputs), calling back into the cloud's own components.
Both stacks import it by putting ``stacks/common`` on ``sys.path`` (``stacks/common/bootstrap.py``),
which works from a checkout and from the copy shipped inside the wheel alike.
"""
