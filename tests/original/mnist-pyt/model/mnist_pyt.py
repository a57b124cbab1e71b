############################################################################
# An mnist-pyt model.py in the shape of the original product's example (our own, smaller): it reads
# DATA_DIR/mnist.npz, trains a dense net with plain PyTorch, and calls the original's callback the way
# that example does (camelCase keywords, lossFunction/metricFunction by name with their Args, a
# DataLoader as adsValData, .logger, on_batch_end() after each batch). The test writes a tiny
# synthetic mnist.npz for each node; nothing is downloaded.
############################################################################

import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from swarmlearning.pyt import SwarmCallback

default_max_epochs = 5
default_min_peers = 2
trainPrint = True
# tell swarm after how many batches it should sync
swSyncInterval = 4


class mnistNet(nn.Module):
    def __init__(self):
        super(mnistNet, self).__init__()
        self.dense = nn.Linear(784, 16)
        self.dropout = nn.Dropout(0.2)
        self.dense1 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.dense(x))
        x = self.dropout(x)
        return F.log_softmax(self.dense1(x), dim=1)


def loadData(dataDir):
    # the original's npz layout: x_train, y_train, x_test, y_test; pixels 0..255
    with np.load(os.path.join(dataDir, 'mnist.npz')) as f:
        xTrain, yTrain = f['x_train'] / 255.0, f['y_train']
        xTest, yTest = f['x_test'] / 255.0, f['y_test']
    xTrain, xTest = torch.tensor(xTrain.astype(np.float32)), torch.tensor(xTest.astype(np.float32))
    yTrain, yTest = torch.tensor(yTrain.astype(np.int64)), torch.tensor(yTest.astype(np.int64))
    return torch.utils.data.TensorDataset(xTrain, yTrain), torch.utils.data.TensorDataset(xTest, yTest)


def doTrainBatch(model, device, trainLoader, optimizer, epoch, swarmCallback):
    model.train()
    for batchIdx, (data, target) in enumerate(trainLoader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if trainPrint and batchIdx % 4 == 0:
            print('Train Epoch: {} [{}/{}]\tLoss: {:.6f}'.format(
                epoch, batchIdx * len(data), len(trainLoader.dataset), loss.item()))
        # Swarm Learning Interface
        if swarmCallback is not None:
            swarmCallback.on_batch_end()


def test(model, device, testLoader):
    model.eval()
    testLoss, correct = 0, 0
    with torch.no_grad():
        for data, target in testLoader:
            output = model(data.to(device))
            testLoss += F.nll_loss(output, target.to(device), reduction='sum').item()
            correct += output.argmax(dim=1).eq(target.to(device)).sum().item()
    print('Test set: Average loss: {:.4f}, Accuracy: {}/{}'.format(
        testLoss / len(testLoader.dataset), correct, len(testLoader.dataset)))


def main():
    dataDir = os.getenv('DATA_DIR', '/platform/data')
    scratchDir = os.getenv('SCRATCH_DIR', '/platform/scratch')
    max_epochs = int(os.getenv('MAX_EPOCHS', str(default_max_epochs)))
    min_peers = int(os.getenv('MIN_PEERS', str(default_min_peers)))
    batchSz = 8
    torch.manual_seed(1)
    torch.set_num_threads(1)
    trainDs, testDs = loadData(dataDir)
    useCuda = torch.cuda.is_available()
    device = torch.device("cuda" if useCuda else "cpu")
    model = mnistNet().to(device)
    model_name = 'mnist_pyt'
    opt = optim.Adam(model.parameters())
    trainLoader = torch.utils.data.DataLoader(trainDs, batch_size=batchSz)
    testLoader = torch.utils.data.DataLoader(testDs, batch_size=batchSz)

    lFArgsDict = {}
    lFArgsDict['reduction'] = 'sum'
    mFArgsDict = {}
    mFArgsDict['task'] = "multiclass"
    mFArgsDict['num_classes'] = 10

    swarmCallback = SwarmCallback(syncFrequency=swSyncInterval,
                                  minPeers=min_peers,
                                  useAdaptiveSync=False,
                                  adsValData=testLoader,
                                  adsValBatchSize=batchSz,
                                  model=model,
                                  totalEpochs=max_epochs,
                                  lossFunction="NLLLoss",
                                  lossFunctionArgs=lFArgsDict,
                                  metricFunction="Accuracy",
                                  metricFunctionArgs=mFArgsDict)
    swarmCallback.logger.setLevel(logging.DEBUG)

    # initialize swarmCallback and do first sync
    swarmCallback.on_train_begin()
    for epoch in range(1, max_epochs + 1):
        doTrainBatch(model, device, trainLoader, opt, epoch, swarmCallback)
        test(model, device, testLoader)
        swarmCallback.on_epoch_end(epoch)
    # handles what to do when training ends
    swarmCallback.on_train_end()

    # Save model and weights
    os.makedirs(os.path.join(scratchDir, model_name), exist_ok=True)
    saved_model_path = os.path.join(scratchDir, model_name, 'saved_model.pt')
    torch.save(model.state_dict(), saved_model_path)
    swarmCallback.logger.info('Saved the trained model - %s', saved_model_path)


if __name__ == '__main__':
    main()
