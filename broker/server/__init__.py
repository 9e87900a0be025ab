"""The brokers the swarm starts: embedded amqtt (hardened), Mosquitto as a child process, the
ACL both enforce, TLS certificates, and the ``swarm-broker`` command. Only a hub imports this."""
