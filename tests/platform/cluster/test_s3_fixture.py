"""The S3 server the storage tests use answers through pyarrow, as ercstudy's storage code will reach it."""

import pyarrow.fs as pafs


def test_bucket_round_trip(bucket):
    fs, root = pafs.FileSystem.from_uri(f"{bucket}/prefix")
    with fs.open_output_stream(f"{root}/hello.txt") as f:
        f.write(b"hello")
    with fs.open_input_stream(f"{root}/hello.txt") as f:
        assert f.read() == b"hello"
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(root))] == ["hello.txt"]
