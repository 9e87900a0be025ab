"""The client side of MQTT: a connection that reconnects and keeps an outbox, broker URLs,
LAN discovery. A node carries this and ``contract``, never ``server``."""
