"""Starts gcp-storage-emulator (its command-line arguments) with the response header that real
Cloud Storage sends with every object download and the emulator leaves out: x-goog-generation.

tensorstore (orbax's arrays) needs it: without it, reading back an OCDBT manifest fails with
"Malformed StorageGeneration".
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except NotFound:  # The 404 stands as it is.
    return
  response['x-goog-generation'] = obj['generation']
  response['x-goog-metageneration'] = obj['metageneration']


objects.download = _download_with_generation  # Before the server module binds its routes.

from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  emulator.main(sys.argv[1:])
