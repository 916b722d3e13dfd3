"""The Ray side of trainyard: resource planning between Ray Data and training workers."""
