"""The test harness, shared by the tests and the programs in ``tools/``.

``stack`` starts the dispatcher's processes, ``services`` knows the local
RabbitMQ, PostgreSQL and MariaDB, ``testrun`` holds a test run's names and
databases, ``processes`` the processes a test starts, ``tokens`` the one way
tokens are created, ``api`` and ``observe`` what tests send and watch,
``traffic`` load that accounts for every request, ``broker_node`` a private
RabbitMQ node, ``vllm_cpu`` and ``tiny_model`` vLLM's CPU build and its model,
``tcpproxy``, ``dbclients`` and ``chart_render`` the rest the tests share.

``tiny_model.py`` still names its old path in its usage line: its bytes are the
recipe's hash, and changing them would make every machine's cached model again.
"""
