"""The AMQP side of a worker (``labq worker``): see :mod:`consumer.worker`."""
