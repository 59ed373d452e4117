"""What the tests share: model files, private Redis servers, steady load, in-process apps,
the Ray cluster driver. Test modules import from here, never from each other."""
