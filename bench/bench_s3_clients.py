"""Which S3 client should S3Device use? Parallel PUT and GET of whole objects, as the device does them.

Runs boto3 (one client shared by the threads, its connection pool sized to them) against obstore (the Rust
object_store crate; its blocking calls release the GIL) on the same bucket, each from a pool of threads,
because S3Device is called from a server's worker threads. Usage:

    python bench/bench_s3_clients.py --endpoint http://127.0.0.1:PORT --bucket B [--threads 16]

The bucket must exist; any access key works on a default SeaweedFS. Prints MiB/s per client, object size and
direction.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def _boto3(endpoint: str, bucket: str, threads: int) -> tuple[Callable[[str, bytes], None], Callable[[str], bytes]]:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "any"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "any"),
        region_name="us-east-1",
        # Its best case: no CRC32 of every body (botocore >= 1.36 computes one unless told it need not).
        config=Config(max_pool_connections=threads, request_checksum_calculation="when_required"),
    )

    def put(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def get(key: str) -> bytes:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    return put, get


def _obstore(endpoint: str, bucket: str, threads: int) -> tuple[Callable[[str, bytes], None], Callable[[str], bytes]]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "any"),
        secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "any"),
        region="us-east-1",
        client_options={"allow_http": True},
    )

    def put(key: str, data: bytes) -> None:
        obstore.put(store, key, data)

    def get(key: str) -> bytes:
        return bytes(obstore.get(store, key).bytes())

    return put, get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--total", type=int, default=128 << 20, help="bytes moved per run (default 128 MiB)")
    parser.add_argument("--sizes", default="65536,262144,1048576")
    args = parser.parse_args()
    clients = {"boto3": _boto3, "obstore": _obstore}
    with ThreadPoolExecutor(args.threads) as pool:
        for size in (int(s) for s in args.sizes.split(",")):
            count = args.total // size
            data = os.urandom(size)
            for name, make in clients.items():
                put, get = make(args.endpoint, args.bucket, args.threads)
                keys = [f"bench-{name}-{size}/{i:016x}" for i in range(count)]
                start = time.perf_counter()
                list(pool.map(put, keys, [data] * count))
                put_time = time.perf_counter() - start
                start = time.perf_counter()
                got = list(pool.map(get, keys))
                get_time = time.perf_counter() - start
                assert all(g == data for g in got)
                mib = count * size / (1 << 20)
                print(
                    f"{name:8} {size // 1024:5} KiB objects x{count:5}: PUT {mib / put_time:7.1f} MiB/s  "
                    f"GET {mib / get_time:7.1f} MiB/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
