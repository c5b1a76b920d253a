"""Datasets and loaders: ImageNet folders or zips, and the procedural demo dataset."""
from .build import Loaders, build_loader, data_path_of, loader_worker_deaths_reported, mixup_active, prepare_demo_data

__all__ = ['Loaders', 'build_loader', 'data_path_of', 'loader_worker_deaths_reported', 'mixup_active',
           'prepare_demo_data']
