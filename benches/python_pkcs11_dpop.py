"""The yardstick of issue #14: DPoP proofs from python-pkcs11 with a hand-built JWS.

PROCS processes of one thread each open the token, log in, and sign proofs with the
ES256 key LABEL for SECONDS: JSON header and claims, base64url, SHA-256 in software,
CKM_ECDSA on the token. Prints the total proofs/s as JSON. Run by scripts/bench-python.sh.

    python3 python_pkcs11_dpop.py MODULE TOKEN_LABEL LABEL PROCS SECONDS   (PIN in KEYBOUND_PIN)
"""
import base64, hashlib, json, multiprocessing as mp, os, sys, time, uuid

import pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def worker(module, token_label, label, seconds, out):
    try:
        out.put(sign_for(module, token_label, label, seconds))
    except BaseException:
        out.put(None)  # the parent stops with an error, not after a timeout
        raise


def sign_for(module, token_label, label, seconds):
    lib = pkcs11.lib(module)
    # SoftHSM lists a token from its files: while another process rewrites one (the
    # agent starting next to this), the token can be missing for a moment.
    for attempt in range(20):
        try:
            token = lib.get_token(token_label=token_label)
            break
        except pkcs11.exceptions.NoSuchToken:
            if attempt == 19:
                raise
            time.sleep(0.1)
    with token.open(user_pin=os.environ["KEYBOUND_PIN"]) as session:
        key = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=label)
        header = b64(json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": {}}).encode())
        n, until = 0, time.monotonic() + seconds
        while time.monotonic() < until:
            claims = {"jti": str(uuid.uuid4()), "htm": "POST", "iat": int(time.time()),
                      "htu": "https://bench.keybound.invalid/oauth2/v1/token"}
            signing_input = header + "." + b64(json.dumps(claims).encode())
            digest = hashlib.sha256(signing_input.encode()).digest()
            signature = key.sign(digest, mechanism=Mechanism.ECDSA)
            _proof = signing_input + "." + b64(signature)
            n += 1
        return n


if __name__ == "__main__":
    module, token_label, label, procs, seconds = sys.argv[1:6]
    procs, seconds = int(procs), float(seconds)
    out = mp.Queue()
    ps = [mp.Process(target=worker, args=(module, token_label, label, seconds, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    made = [out.get(timeout=seconds + 60) for _ in ps]
    if None in made:
        sys.exit("a worker could not open the token")
    total = sum(made)
    for p in ps:
        p.join()
    print(json.dumps({"processes": procs, "seconds": seconds, "proofs_per_s": total / seconds}))
