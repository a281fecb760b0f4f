"""Ansible module: a Mosquitto password file that matches a {username: password} mapping.

mosquitto_passwd salts every hash, so hashing again on each run would rewrite the file (and
restart the broker) every time. This module first checks the existing hashes against the
wanted passwords and only when a user or a password differs does it let `mosquitto_passwd -U`
hash a fresh file, written with mode 0600 next to the target and moved over it atomically.
"""

import base64
import binascii
import hashlib
import hmac
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: mosquitto_passwords
short_description: Keep a Mosquitto password file in line with a mapping of users to passwords
description:
  - Verifies the hashes already in O(path) against O(users) (PBKDF2-SHA512 C($7$) and SHA512
    C($6$) formats) and rewrites the file with C(mosquitto_passwd -U) only when they differ.
  - Users in the file but not in O(users) are removed.
options:
  path:
    description: The password file.
    type: path
    required: true
  users:
    description: Username to plain-text password. Usernames may not contain C(:) or spaces.
    type: dict
    required: true
  mosquitto_passwd:
    description: The mosquitto_passwd executable; searched on PATH and in /usr/sbin when unset.
    type: path
extends_documentation_fragment:
  - ansible.builtin.files
author:
  - sled-fleet
"""

EXAMPLES = r"""
- name: Write the broker's password file
  mosquitto_passwords:
    path: /etc/mosquitto/passwd
    users:
      board-a: "{{ vault_board_a_password }}"
    owner: root
    group: mosquitto
    mode: "0640"
"""

RETURN = r"""
users:
  description: The usernames in the file, sorted.
  returned: always
  type: list
  elements: str
added:
  description: Usernames that were not in the file before.
  returned: always
  type: list
  elements: str
removed:
  description: Usernames dropped from the file.
  returned: always
  type: list
  elements: str
updated:
  description: Usernames whose password changed (or whose hash could not be verified).
  returned: always
  type: list
  elements: str
"""


def read_hashes(path):
    """username -> stored hash of an existing password file ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    hashes = {}
    with open(path, encoding="utf-8") as stored:
        for line in stored:
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                user, stored_hash = line.split(":", 1)
                hashes[user] = stored_hash
    return hashes


def hash_matches(stored_hash, password):
    """Whether a mosquitto hash is of `password`; False for a format this module cannot read
    (the file is then rewritten, which is always safe)."""
    parts = stored_hash.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
        elif len(parts) == 4 and parts[1] == "6":
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            candidate = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(candidate, digest)


def check_users(module, users):
    for user, password in users.items():
        if not user or any(c in user for c in ": \t\r\n"):
            module.fail_json(msg=f"broker username {user!r} is empty or contains ':' or whitespace")
        if not isinstance(password, str) or not password or any(c in password for c in "\r\n"):
            module.fail_json(msg=f"the broker password of {user!r} must be a non-empty single-line string")


def write_hashed(module, path, users, tool):
    """Plain text into a private temporary file beside `path`, hashed in place, moved over."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, plain = tempfile.mkstemp(prefix=".passwd-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for user in sorted(users):
                out.write(f"{user}:{users[user]}\n")
        rc, stdout, stderr = module.run_command([tool, "-U", plain])
        if rc != 0:
            module.fail_json(msg=f"mosquitto_passwd -U failed ({rc}): {(stderr or stdout).strip()}")
        module.atomic_move(plain, path)
    finally:
        if os.path.exists(plain):
            os.unlink(plain)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {"type": "dict", "required": True, "no_log": True},
            "mosquitto_passwd": {"type": "path"},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path, users = module.params["path"], module.params["users"]
    check_users(module, users)
    existing = read_hashes(path)
    added = sorted(set(users) - set(existing))
    removed = sorted(set(existing) - set(users))
    updated = sorted(u for u in set(users) & set(existing) if not hash_matches(existing[u], users[u]))
    changed = bool(added or removed or updated)
    if changed and not module.check_mode:
        tool = module.params["mosquitto_passwd"] or module.get_bin_path(
            "mosquitto_passwd", required=True, opt_dirs=["/usr/sbin", "/usr/bin"]
        )
        write_hashed(module, path, users, tool)
    if os.path.exists(path):
        file_args = module.load_file_common_arguments(module.params, path=path)
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, users=sorted(users), added=added, removed=removed, updated=updated)


if __name__ == "__main__":
    main()
