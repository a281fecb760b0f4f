"""Mosquitto for the fleet: the shared config and ACL templates (also used by the Ansible
`mosquitto` role), generated certificates and passwords, and a broker process this program
owns (`fleet broker`, the demo and the tests)."""
